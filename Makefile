# The README's commands. `make` alone prints this list. PYTHON picks the interpreter
# (default: python3 on PATH, i.e. your activated virtual environment).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -r requirements.txt
# -s: make echoes no commands, so the script's own lines are what a user reads
MAKEFLAGS += -s

.PHONY: help install run offline test gpu-check
help:
	@echo "make run        install dependencies, then run exercise 1.1 (MLP on MNIST; downloads MNIST)"
	@echo "make offline    install dependencies, then run exercise 1.1 on the bundled digits (no download)"
	@echo "make test       install dependencies, then run the test suite (CPU, offline)"
	@echo "make gpu-check  on a CUDA machine: smoke-run every exercise and benchmark the 1.3 default"

install:
	$(PIP)
	@# wandb's sweep-config validator (tests only). It pins numpy<2 but does not need it to
	@# validate, so it is installed without its dependencies; jsonschema/jsonref come from requirements.
	$(PYTHON) -m pip install -q --no-deps sweeps==0.3.0

# A failing script (offline, say) keeps its non-zero exit status: scripts and CI rely on it. With -s
# its one-line error is the last line before make's own "Error 1" (make always prints that one).
run: install
	$(PYTHON) exercise_1_1.py $(ARGS)

offline: install
	$(PYTHON) exercise_1_1.py --dataset digits $(ARGS)

test: install
	$(PYTHON) -m pytest -q -n auto --dist worksteal tests

gpu-check: install
	$(PYTHON) bench/gpu_check.py $(ARGS)
