"""Headline numbers come from committed run records (COMMON.md, "Docs and numbers").

A number in README.md or docs/*.md followed by `<!-- record: PATH KEY.PATH -->` must equal the
value at KEY.PATH (dot-separated, list indices as integers) in the JSON file PATH under results/,
rounded to the decimals shown; a number shown with % is the value x 100. Bold markers between
the number and the comment are allowed (`**90.45%**<!-- record: ... -->`). Records are small
JSON files (a run's results.json and config.json, or one summary), never checkpoints or logs:
copy a finished run's with `python report.py --record runs/<exercise>/<run>`.
"""
import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = re.compile(r'(-?\d[\d,]*(?:\.\d+)?)(%?)(?:\*{1,2})?<!-- record: (\S+) (\S+) -->')
MAX_RECORD_BYTES = 64 * 1024  # a results.json with per-class values and provenance is a few KB


def doc_files(root: str = ROOT) -> list[str]:
    return [p for p in [os.path.join(root, 'README.md'), *sorted(glob.glob(os.path.join(root, 'docs', '*.md')))]
            if os.path.exists(p)]


def value_at(obj, key_path: str):
    """obj at a dotted path; a key that itself holds dots (2.3's cascade steps, 'stage3.block1') is
    matched by joining parts, the shortest match first."""
    parts, i = key_path.split('.'), 0
    while i < len(parts):
        if isinstance(obj, list):
            obj, i = obj[int(parts[i])], i + 1
            continue
        j = next((j for j in range(i + 1, len(parts) + 1) if '.'.join(parts[i:j]) in obj), None)
        if j is None:
            raise KeyError(parts[i])
        obj, i = obj['.'.join(parts[i:j])], j
    return obj


def problems(text: str, where: str, root: str = ROOT) -> list[str]:
    """What is wrong with the record comments of one document (empty: every number matches)."""
    found, out = RECORD.findall(text), []
    if len(found) != text.count('<!-- record:'):
        out.append(f"{where}: {text.count('<!-- record:') - len(found)} record comment(s) not right after a number "
                   f"or not of the form <!-- record: PATH KEY.PATH -->")
    for number, pct, path, key in found:
        shown = f'{number}{pct} ({path} {key})'
        full = os.path.normpath(os.path.join(root, path))
        if not full.startswith(os.path.join(root, 'results') + os.sep) or not path.endswith('.json'):
            out.append(f"{where}: {shown}: a record is a JSON file under results/")
            continue
        try:
            with open(full) as f:
                value = value_at(json.load(f), key)
        except FileNotFoundError:
            out.append(f"{where}: {shown}: {path} does not exist")
            continue
        except (KeyError, IndexError, ValueError, TypeError) as e:
            out.append(f"{where}: {shown}: no {key} in {path} ({type(e).__name__})")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out.append(f"{where}: {shown}: {key} is {value!r}, not a number")
            continue
        digits = number.replace(',', '')
        decimals = len(digits.split('.')[1]) if '.' in digits else 0
        expected = f'{value * 100 if pct else value:.{decimals}f}'
        if expected != digits:
            out.append(f"{where}: {shown}: the record says {expected}{pct}")
    return out


def test_every_recorded_number_in_the_docs_matches_its_record():
    found = [p for path in doc_files() for p in problems(open(path).read(), os.path.relpath(path, ROOT))]
    assert not found, '\n'.join(found)


def test_records_are_small_json_under_results():
    files = [p for p in glob.glob(os.path.join(ROOT, 'results', '**', '*'), recursive=True) if os.path.isfile(p)]
    assert files  # at least exercise 1.1's
    for path in files:
        assert path.endswith('.json') and os.path.getsize(path) <= MAX_RECORD_BYTES, path
        with open(path) as f:
            json.load(f)


@pytest.fixture
def record_1_1():
    """(path relative to the repo, results) of the committed exercise 1.1 run on Fashion-MNIST."""
    [path] = glob.glob(os.path.join(ROOT, 'results', 'exercise_1_1', '*fashion_mnist*', 'results.json'))
    with open(path) as f:
        return os.path.relpath(path, ROOT), json.load(f)


def test_the_check_fails_on_a_hand_edited_number(record_1_1, tmp_path):
    path, results = record_1_1
    acc = f"{100 * results['test_acc']:.2f}%"
    good = (f"| 1.1 | **{acc}**<!-- record: {path} test_acc --> "
            f"| {results['epochs_run']}<!-- record: {path} epochs_run --> |")
    doc = tmp_path / 'README.md'  # a temporary copy of a README line, then edited by hand
    doc.write_text(good)
    assert problems(doc.read_text(), 'copy') == []
    edited = good.replace(acc, f"{100 * results['test_acc'] + 0.01:.2f}%")
    assert problems(edited, 'copy') == [f"copy: {edited.split('**')[1].split('<')[0]} ({path} test_acc): "
                                        f"the record says {acc}"]
    assert problems(good.replace(acc, f"{100 * results['test_acc']:.1f}%"), 'copy') == []  # fewer decimals: rounded
    assert problems(good.replace(acc, f"{results['test_acc']:.4f}"), 'copy') == []  # a fraction, no %
    assert 'does not exist' in problems(good.replace(path, path.replace('results.json', 'gone.json')), 'copy')[0]
    assert 'no test_accc' in problems(good.replace('test_acc -->', 'test_accc -->'), 'copy')[0]
    assert 'under results/' in problems(good.replace(path, 'README.json'), 'copy')[0]
    assert 'not right after a number' in problems(good.replace(f'**{acc}**', f'{acc} (test)'), 'copy')[0]
    per_class = f"{100 * results['per_class_acc'][3]:.1f}%<!-- record: {path} per_class_acc.3 -->"
    assert problems(per_class, 'copy') == []  # list indices
    assert value_at({'cascade': {'stage3.block1': {'rho': 0.5}}}, 'cascade.stage3.block1.rho') == 0.5  # dotted keys
