# The two commands of the README. `make` alone prints this list.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -r requirements.txt

.PHONY: help install run test
help:
	@echo "make run    install dependencies, then run exercise 1.1 (MLP on MNIST)"
	@echo "make test   install dependencies, then run the test suite (CPU, offline)"

install:
	$(PIP)
	@# wandb's sweep-config validator (tests only). It pins numpy<2 but does not need it to
	@# validate, so it is installed without its dependencies; jsonschema/jsonref come from requirements.
	$(PYTHON) -m pip install -q --no-deps sweeps==0.3.0

run: install
	$(PYTHON) exercise_1_1.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q tests
