"""Compare runs without W&B: one Markdown table per exercise, from the run folders alone.

    python report.py                  # every run under runs/ -> runs/report.md (and printed)
    python report.py RUNS_DIR --plot  # also the validation curves of the listed runs, one PNG per exercise
    python report.py --record runs/exercise_1_1/<run>   # copy its results.json and config.json to
                                                        # results/exercise_1_1/<run>/ (a record docs can cite)

A run is a folder RUNS_DIR/<exercise>/<run>/ with config.json; it is finished when it has
results.json, and listed as unfinished otherwise. A table shows, per run: the settings that
differ between the runs of its exercise, test accuracy, best validation accuracy (epoch),
epochs, time, device and git commit (`+` = uncommitted changes), from results.json and its
provenance. Curves come from the runs' TensorBoard event files (val/acc).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from config import UserError, run_main
from files import atomic_write, copy_file, save_figure
from provenance import REPO

# where and how a run was run and logged: never a "setting that differs"
NOT_SETTINGS = {'run_name', 'runs_dir', 'data_dir', 'resume', 'overwrite', 'wandb', 'wandb_project', 'wandb_verbose'}


def _json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find_runs(runs_dir: str) -> dict[str, list[dict]]:
    """{exercise: [{'name', 'dir', 'config', 'results' (None if unfinished)}]}, sorted by name."""
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, '*', '*', 'config.json'))):
        run_dir = os.path.dirname(path)
        config = _json(path)
        if config is None:
            continue
        out.setdefault(os.path.basename(os.path.dirname(run_dir)), []).append(
            {'name': os.path.basename(run_dir), 'dir': run_dir, 'config': config,
             'results': _json(os.path.join(run_dir, 'results.json'))})
    return out


def differing(runs: list[dict]) -> list[str]:
    """The config keys whose values are not the same in every run (missing counts as a value)."""
    keys = dict.fromkeys(k for r in runs for k in r['config'] if k not in NOT_SETTINGS)
    return [k for k in keys if len({json.dumps(r['config'].get(k), sort_keys=True) for r in runs}) > 1]


def setting(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def percent(x) -> str:
    return f'{100 * x:.2f}%' if isinstance(x, (int, float)) else '—'


def row_of(run: dict, keys: list[str]) -> list[str]:
    settings = [setting(run['config'][k]) if k in run['config'] else '—' for k in keys]
    r = run['results']
    if r is None:
        checkpoint = os.path.exists(os.path.join(run['dir'], 'checkpoints', 'last.pt'))
        status = 'unfinished' + (' (has last.pt)' if checkpoint else '')
        return [run['name'], *settings, status, '—', '—', '—', '—', '—']
    prov = r.get('provenance') or {}
    test_acc = r.get('test_acc', (r.get('cnn_setup') or {}).get('test_acc'))
    best = percent(r.get('best_val_acc')) + (f" ({r['best_epoch']})" if 'best_epoch' in r else '')
    seconds = r.get('train_seconds', r.get('seconds'))
    commit = prov.get('git_commit') or '—'
    commit = commit[:7] + ('+' if prov.get('git_dirty') else '') if len(commit) == 40 else commit
    return [run['name'], *settings, percent(test_acc), best, str(r.get('epochs_run', '—')),
            f'{seconds:.0f} s' if isinstance(seconds, (int, float)) else '—',
            prov.get('device_name') or r.get('device') or '—', commit]


def markdown(exercise: str, runs: list[dict]) -> str:
    keys = differing(runs)
    header = ['run', *keys, 'test acc', 'best val acc (epoch)', 'epochs', 'time', 'device', 'commit']
    lines = [f'## {exercise}', '', '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    lines += ['| ' + ' | '.join(cell.replace('|', '\\|') for cell in row_of(r, keys)) + ' |' for r in runs]
    done = sum(r['results'] is not None for r in runs)
    lines += ['', f'{done} finished, {len(runs) - done} unfinished.' if done < len(runs) else f'{done} finished.']
    return '\n'.join(lines)


def val_curves(run_dir: str) -> list[tuple[int, float]]:
    """(epoch, val/acc) from the run's TensorBoard event files; [] when there are none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir, size_guidance={'scalars': 0})
    acc.Reload()
    if 'val/acc' not in acc.Tags().get('scalars', []):
        return []
    return [(e.step, e.value) for e in acc.Scalars('val/acc')]


def plot(exercise: str, runs: list[dict], path: str) -> str | None:
    curves = {r['name']: val_curves(r['dir']) for r in runs}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    from evaluate import integer_ticks, pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [100 * v for _, v in points], marker='.', label=name)
    ax.set_xlabel('epoch')
    ax.set_ylabel('val acc (%)')
    ax.set_title(f'{exercise}: validation accuracy')
    ax.grid(alpha=0.3)
    integer_ticks(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def report(runs_dir: str, with_plots: bool = False) -> str:
    """Write runs_dir/report.md (and with_plots, runs_dir/report_<exercise>.png); return the Markdown."""
    if not os.path.isdir(runs_dir):
        raise UserError(f"{runs_dir} is not a folder; give the runs folder (default: runs)")
    found = find_runs(runs_dir)
    if not found:
        raise UserError(f"no runs under {runs_dir} (a run is {runs_dir}/<exercise>/<run>/config.json)")
    parts = [f'# Runs under {runs_dir}']
    for exercise, runs in found.items():
        parts.append(markdown(exercise, runs))
        if with_plots:
            png = plot(exercise, runs, os.path.join(runs_dir, f'report_{exercise}.png'))
            if png:
                parts.append(f'![{exercise} validation accuracy]({os.path.basename(png)})')
    text = '\n\n'.join(parts) + '\n'
    atomic_write(os.path.join(runs_dir, 'report.md'), lambda f: f.write(text), binary=False)
    return text


def record(run_dir: str, results_dir: str = os.path.join(REPO, 'results')) -> str:
    """Copy a finished run's results.json and config.json to results/<exercise>/<run>/."""
    run_dir = os.path.abspath(run_dir.rstrip('/'))
    if not os.path.exists(os.path.join(run_dir, 'results.json')):
        raise UserError(f"{run_dir} has no results.json: only a finished run can be recorded")
    target = os.path.join(results_dir, os.path.basename(os.path.dirname(run_dir)), os.path.basename(run_dir))
    if os.path.exists(target):
        raise UserError(f"{target} exists: a record is never replaced silently; delete it first")
    os.makedirs(target)
    for name in ('results.json', 'config.json'):
        copy_file(os.path.join(run_dir, name), os.path.join(target, name))
    return target


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs_dir', nargs='?', default='runs', help='the runs folder (default: runs)')
    parser.add_argument('--plot', action='store_true', help='also overlay the validation curves, one PNG per exercise')
    parser.add_argument('--record', metavar='RUN_DIR', help="copy a finished run's results.json and config.json "
                                                            "to results/<exercise>/<run>/ and stop")
    args = parser.parse_args(argv)
    if args.record:
        print(f"recorded {record(args.record)}")
        return
    print(report(args.runs_dir, args.plot), end='')
    print(f"-> {os.path.join(args.runs_dir, 'report.md')}")


if __name__ == '__main__':
    run_main(main)
