"""Every (script, dataset) pair a script lists learns with the script's defaults (issue 15, item 1).

Each pair runs as a user runs it (a subprocess: `python exercise_X.py --dataset D ...`) with the
script's defaults, per-dataset defaults included; only the budget is cut where a full run does
not fit a CPU (BUDGET: fewer epochs, a subset), and said in the output. A pair passes when its
test accuracy is far above chance (FAR_ABOVE_CHANCE) and no epoch diverged.

Where data is missing it stands in, and the output says so:
  mnist    Fashion-MNIST's files in MNIST's place (the same IDX format), when <data_dir>/MNIST is missing;
  cifar10  synthetic images in CIFAR-10's on-disk format (tests/synthetic.py) when the real files are
           missing: checks only that the recipe does not diverge, not what it scores.

    python bench/bench_defaults.py --data_dir /work/data             # every pair
    python bench/bench_defaults.py --data_dir /work/data --only exercise_1_3:digits
Writes <runs_dir>/bench_defaults.json (runs under <runs_dir>/bench_defaults/; with --only, the
other pairs' rows already there are kept); exit 1 if a pair fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, 'tests'))

FAR_ABOVE_CHANCE = 5  # x chance (10 classes: 50% test accuracy)

# (script, dataset) -> overrides of the budget only; {} = the script's full defaults
BUDGET = {
    ('exercise_1_1', 'digits'): {},
    ('exercise_1_1', 'fashion_mnist'): {'epochs': 2},
    ('exercise_1_1', 'mnist'): {'epochs': 2},
    ('exercise_1_2', 'digits'): {'part': 'single'},  # the study's cells are this same run at other depths
    ('exercise_1_2', 'fashion_mnist'): {'part': 'single', 'epochs': 2},
    ('exercise_1_2', 'mnist'): {'part': 'single', 'epochs': 2},
    ('exercise_1_3', 'digits'): {},
    ('exercise_1_3', 'fashion_mnist'): {'epochs': 4, 'subset': 10000},
    ('exercise_1_3', 'mnist'): {'epochs': 4, 'subset': 10000},
    ('exercise_1_3', 'cifar10'): {'epochs': 8, 'subset': 3000},
}


def synthetic_cifar(folder: str, n_train: int = 5000, n_test: int = 1000) -> None:
    """CIFAR-10's files with learnable synthetic images: class c is a bright 8x8 square at one of
    ten places on noise, in one colour channel."""
    from synthetic import write_cifar10
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (('train', n_train), ('test', n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 80, (n, 3, 32, 32)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = 4 + 16 * (c // 5), 1 + 6 * (c % 5)
            x[i, c % 3, r:r + 8, col:col + 8] = 255
        arrays[split] = (x, y)
    write_cifar10(folder, arrays, [f'class{c}' for c in range(10)])


def data_dirs(data_dir: str, scratch: str) -> tuple[dict[str, str], dict[str, str]]:
    """({dataset: data_dir to use}, {dataset: what stands in for it})."""
    dirs, stand_ins = {d: data_dir for d in ('mnist', 'fashion_mnist', 'cifar10', 'digits')}, {}
    fashion = os.path.join(data_dir, 'FashionMNIST', 'raw')
    if not os.path.isdir(os.path.join(data_dir, 'MNIST')) and os.path.isdir(fashion):
        os.makedirs(os.path.join(scratch, 'MNIST'))
        os.symlink(os.path.abspath(fashion), os.path.join(scratch, 'MNIST', 'raw'))
        dirs['mnist'], stand_ins['mnist'] = scratch, "Fashion-MNIST's files in MNIST's place"
    if not os.path.isdir(os.path.join(data_dir, 'cifar-10-batches-py')):
        synthetic_cifar(scratch)
        dirs['cifar10'], stand_ins['cifar10'] = scratch, 'synthetic images in CIFAR-10 format: divergence check only'
    return dirs, stand_ins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data_dir', default=os.environ.get('DLA_DATA', './data'))
    parser.add_argument('--runs_dir', default='./runs')
    parser.add_argument('--only', nargs='*', default=[], help='script:dataset pairs (default: all)')
    args = parser.parse_args()
    out_dir = os.path.join(args.runs_dir, 'bench_defaults')
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as scratch:
        dirs, stand_ins = data_dirs(args.data_dir, scratch)
        for (script, dataset), budget in BUDGET.items():
            if args.only and f'{script}:{dataset}' not in args.only:
                continue
            name = f'{script}-{dataset}'
            argv = ['--dataset', dataset, '--data_dir', dirs[dataset], '--runs_dir', out_dir, '--run_name', name,
                    '--overwrite', 'True', '--wandb', 'off'] + [x for k, v in budget.items() for x in (f'--{k}', str(v))]
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, os.path.join(HERE, f'{script}.py'), *argv], cwd=HERE,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            results_path = os.path.join(out_dir, script, name, 'results.json')
            if done.returncode or not os.path.exists(results_path):
                rows.append({'script': script, 'dataset': dataset, 'budget': budget, 'error': done.stderr[-500:]})
                failed.append(name)
                print(f"{name:<28} FAILED (exit {done.returncode}): {done.stderr.strip()[-200:]}", flush=True)
                continue
            with open(results_path) as f:
                results = json.load(f)
            chance = 1 / len(results['per_class_acc'])
            synthetic = dataset in stand_ins and dataset == 'cifar10'
            ok = results.get('diverged') is None and (synthetic or results['test_acc'] >= FAR_ABOVE_CHANCE * chance)
            rows.append({'script': script, 'dataset': dataset, 'stand_in': stand_ins.get(dataset, ''),
                         'budget': budget or 'full defaults', 'test_acc': results['test_acc'],
                         'best_val_acc': results['best_val_acc'], 'epochs_run': results['epochs_run'],
                         'diverged': results.get('diverged'), 'chance': chance, 'seconds': round(seconds, 1),
                         'ok': ok})
            failed += [] if ok else [name]
            print(f"{name:<28} test acc {100 * results['test_acc']:6.2f}% (chance {100 * chance:.0f}%) "
                  f"{'ok' if ok else 'FAIL'} | {budget or 'full defaults'} | {seconds:.0f} s"
                  + (f" | {stand_ins[dataset]}" if dataset in stand_ins else ''), flush=True)
    import torch
    summary = {'far_above_chance': f'test acc >= {FAR_ABOVE_CHANCE} x chance, and no epoch diverged',
               'hardware': f'{os.cpu_count()} CPU cores, torch {torch.__version__}, '
                           f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}',
               'rows': rows}
    os.makedirs(args.runs_dir, exist_ok=True)
    path = os.path.join(args.runs_dir, 'bench_defaults.json')
    if args.only and os.path.exists(path):  # a partial run replaces its own pairs, keeps the others
        with open(path) as f:
            kept = [r for r in json.load(f)['rows'] if f"{r['script']}:{r['dataset']}" not in args.only]
        order = list(BUDGET)
        summary['rows'] = sorted(kept + rows, key=lambda r: order.index((r['script'], r['dataset'])))
    from files import write_json
    print(f"wrote {write_json(path, summary)}"
          + (f"; FAILED: {', '.join(failed)}" if failed else '; every pair learns'))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
