"""Depth studies: train a grid of (model, depth) runs, compare them, look at their gradients.

Shared by exercise 1.2 (MLP vs SkipMLP) and 1.3 (plain vs residual CNN). The exercise supplies
`build_model(config, data)`, which reads config['model'] and config['depth'] (and whatever
else it needs, e.g. config['width']); everything else is here:

    rows, summary = run_seeded_study('exercise_1_2', config, build_model, depths=[2, 4, 8],
                                     seeds=[0, 1, 2], lrs=[3e-4, 1e-3, 3e-3])  # trains or skips
    write_csv(rows, 'runs/exercise_1_2/study.csv')
    write_csv(summary, 'runs/exercise_1_2/study_summary.csv', SUMMARY_COLUMNS)
    chosen = [r for r in rows if r['chosen']]          # the chosen lr's cells, one per seed
    save_figure(plot_study(chosen), 'runs/exercise_1_2/study_acc.png')
    save_figure(plot_loss_curves(chosen), 'runs/exercise_1_2/study_loss.png')
    records = gradient_study('exercise_1_2', config, build_model, depths=[2, 4, 8])
    save_figure(plot_grad_norms(records), 'runs/exercise_1_2/grad_norms.png')

run_study(exercise, config, build_model, models, depths) is the one-seed, one-lr form: config's own
seed and lr for every cell (exercise 2.1 reuses its cells).

Every cell is an ordinary run (Run -> load_data -> build_model -> train -> report) named
study-<model>-d<depth>-<id>, where <id> is a hash of every setting that shapes the cell's result
(cell_id: data, model, optimisation, seed... all but where and how it runs and logs). Running
the same study again skips cells whose results.json exists and resumes a cell whose
checkpoints/last.pt exists; a study with another width, lr or dataset gets cells of its own, so
a table or a plot never mixes cells trained with different settings.

A seeded study (run_seeded_study: the exercises' study_seeds and study_lrs) picks each (model,
depth)'s lr on the validation split with its first seed, then trains its other seeds at that lr
only; every one of those runs is an ordinary cell as above. docs/exercise_1_2.md says how.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import statistics
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import checkpoint
from config import UserError, identity
from dataset import Data, load_data
from device import init_distributed, is_main, pick_device
from evaluate import evaluate, integer_ticks, load_model, plain_log_labels, pyplot
from files import atomic_write, save_figure
from sinks import log_tables
from training import BuildModel, cached_run, digest

CSV_COLUMNS = ['model', 'depth', 'width', 'lr', 'seed', 'chosen', 'params', 'best_val_acc', 'test_acc',
               'final_train_loss', 'clean_train_loss', 'clean_train_acc', 'train_seconds', 'cell']
SUMMARY_COLUMNS = ['model', 'depth', 'lr', 'n_seeds', 'test_acc_mean', 'test_acc_std', 'test_acc_min', 'test_acc_max',
                   'best_val_acc_mean', 'clean_train_loss_mean', 'params']
# The exercises' keys that pick which cells a seeded study trains: no cell's setting, so left out of
# the shared cell config (study_config) and of every cell's identity
GRID_KEYS = ('study_seeds', 'study_lrs')


# ---------------------------------------------------------------------------------------------
# Cells

def cell_config(config: dict, model: str, depth: int) -> dict:
    return {**config, 'model': model, 'depth': depth, 'resume': '', 'run_name': ''}


def cell_id(cell: dict) -> str:
    """The digest of every key that shapes the cell's result (config.identity)."""
    return digest(identity(cell))


def cell_dir(exercise: str, cell: dict) -> str:
    return os.path.join(cell['runs_dir'], exercise, f"study-{cell['model']}-d{cell['depth']}-{cell_id(cell)}")


def run_study(exercise: str, config: dict, build_model: BuildModel,
              models: Sequence[str] = ('plain', 'residual'),
              depths: Sequence[int] = (2, 4, 8, 16, 32, 64)) -> list[dict]:
    """Train every (model, depth) cell with `config` (one seed, one lr), skipping finished cells,
    resuming broken ones.

    A cell's config is `config` with model, depth, run_name and resume set; a resumed cell
    continues with its checkpoint's config. Returns one row per cell: the CSV_COLUMNS plus
    'history' (the per-epoch rows of train()).
    """
    rows, data = [], {}
    for depth in depths:
        for model in models:
            rows.append({**study_cell(exercise, cell_config(config, model, depth), build_model, data), 'chosen': True})
    return rows


def study_cell(exercise: str, cell: dict, build_model: BuildModel, data: dict) -> dict:
    """Train (or skip, or resume) one cell; its row. `data` caches the loaded splits between cells
    (every cell of a study reads the same splits: dataset.SPLIT_SEED, whatever the seed)."""
    run_dir, _ = cached_run(exercise, cell, os.path.basename(cell_dir(exercise, cell)), build_model, quiet=True)
    if 'data' not in data:
        data['data'] = load_data(cell, pick_device(cell['device']))
    return {**study_row(run_dir, cell), **clean_train(run_dir, data['data'])}


def check_grid(seeds: Sequence[int], lrs: Sequence[float]) -> None:
    """A seeded study's grid: at least one seed, no repeats, every lr > 0 (before anything trains)."""
    if not seeds or len(set(seeds)) != len(seeds) or not all(type(s) is int for s in seeds):
        raise UserError(f"--study_seeds must list distinct integer seeds, at least one, got {list(seeds)!r}")
    if len(set(lrs)) != len(lrs) or not all(type(lr) in (int, float) and lr > 0 for lr in lrs):
        raise UserError(f"--study_lrs must list distinct learning rates > 0 ([] = just --lr), got {list(lrs)!r}")


def lr_grid(config: dict, lrs: Sequence[float]) -> list[float]:
    """The learning rates a seeded study tries: `lrs` as floats (`--study_lrs [1]` is the cell of lr
    1.0, not a digest of its own), [] = just config['lr']."""
    return [float(lr) for lr in lrs] or [config['lr']]


def choose_lr(grid: list[dict]) -> float:
    """The lr of the grid row with the best validation accuracy, a tie going to the smaller lr.
    Only best_val_acc is read: the test split never chooses anything."""
    return max(grid, key=lambda r: (r['best_val_acc'], -r['lr']))['lr']


def run_seeded_study(exercise: str, config: dict, build_model: BuildModel,
                     models: Sequence[str] = ('plain', 'residual'),
                     depths: Sequence[int] = (2, 4, 8, 16, 32, 64),
                     seeds: Sequence[int] = (0,), lrs: Sequence[float] = ()) -> tuple[list[dict], list[dict]]:
    """Per (model, depth): seeds[0] at every lr of `lrs` ([] = just config['lr']), the lr with the best
    validation accuracy chosen (choose_lr), then seeds[1:] at that lr only: len(lrs) + len(seeds) - 1
    cells, each an ordinary cached cell (its id holds its lr and seed), so a re-run trains nothing new.
    The console gets one line per (model, depth): the cell's own line when it is one cell, else its
    summary (group_line).

    Returns (rows, summary): one row per cell (as run_study's, 'chosen' True for the chosen lr's
    cells) and one summary row per (model, depth) over its chosen cells (summarise).
    """
    check_grid(seeds, lrs)
    one_cell = len(lr_grid(config, lrs)) + len(seeds) - 1 == 1
    rows, data = [], {}
    for depth in depths:
        for model in models:
            base, hows = cell_config(config, model, depth), []

            def cell(lr: float, seed: int) -> dict:
                if one_cell:
                    return study_cell(exercise, {**base, 'lr': lr, 'seed': seed}, build_model, data)
                row, how = held_back(exercise, {**base, 'lr': lr, 'seed': seed}, build_model, data)
                hows.append(how)
                return row
            grid = [cell(lr, seeds[0]) for lr in lr_grid(config, lrs)]
            lr = choose_lr(grid)
            mine = [{**r, 'chosen': r['lr'] == lr} for r in grid] + [{**cell(lr, s), 'chosen': True} for s in seeds[1:]]
            if not one_cell and is_main():
                print(group_line(mine, summarise(mine)[0], hows), flush=True)
            rows += mine
    return rows, summarise(rows)


def held_back(exercise: str, cell: dict, build_model: BuildModel, data: dict) -> tuple[dict, str]:
    """study_cell with the cell's own console line held back (whatever else it prints passes through);
    returns its row and how it ran: 'trained', 'resumed' or 'reused'."""
    folder = cell_dir(exercise, cell)
    how = ('reused' if os.path.exists(os.path.join(folder, 'results.json')) else
           'resumed' if os.path.exists(os.path.join(folder, 'checkpoints', 'last.pt')) else 'trained')
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            row = study_cell(exercise, cell, build_model, data)
    finally:  # an interrupted cell's lines (where its checkpoint went) still reach the console
        for line in printed.getvalue().splitlines():
            if not line.startswith(f"{os.path.basename(folder)}: "):
                print(line)
    return row, how


def group_line(rows: list[dict], summary: dict, hows: list[str]) -> str:
    """One (model, depth) of a seeded study: the grid's val accuracies, the chosen lr, test accuracy
    over the seeds (mean +- sample std, min-max), clean train loss, and how many cells were trained."""
    vals = '/'.join(f"{100 * r['best_val_acc']:.2f}" for r in rows if r['seed'] == rows[0]['seed'])
    std = '-' if summary['test_acc_std'] is None else f"{100 * summary['test_acc_std']:.2f}"
    counts = ', '.join(f'{hows.count(h)} {h}' for h in ('trained', 'resumed', 'reused') if h in hows)
    return (f"study-{summary['model']}-d{summary['depth']}: lr {summary['lr']:.1e} (val {vals}), test "
            f"{100 * summary['test_acc_mean']:.2f}% +- {std} ({100 * summary['test_acc_min']:.2f}-"
            f"{100 * summary['test_acc_max']:.2f}), {summary['n_seeds']} seeds, clean train loss "
            f"{summary['clean_train_loss_mean']:.3f}; {len(rows)} cells: {counts}")


def summarise(rows: list[dict]) -> list[dict]:
    """Per (model, depth), over its chosen rows (one per seed): the SUMMARY_COLUMNS. test_acc_std is the
    sample standard deviation (n - 1), None for a single seed."""
    cells: dict = {}
    for r in rows:
        if r['chosen']:
            cells.setdefault((r['model'], r['depth']), []).append(r)
    summary = []
    for (model, depth), mine in cells.items():
        test = [r['test_acc'] for r in mine]
        summary.append({'model': model, 'depth': depth, 'lr': mine[0]['lr'], 'n_seeds': len(mine),
                        'test_acc_mean': statistics.fmean(test),
                        'test_acc_std': statistics.stdev(test) if len(test) > 1 else None,
                        'test_acc_min': min(test), 'test_acc_max': max(test),
                        'best_val_acc_mean': statistics.fmean(r['best_val_acc'] for r in mine),
                        'clean_train_loss_mean': statistics.fmean(r['clean_train_loss'] for r in mine),
                        'params': mine[0]['params']})
    return summary


def chosen_cells(exercise: str, config: dict, models: Sequence[str], depths: Sequence[int],
                 seeds: Sequence[int], lrs: Sequence[float]) -> dict[tuple[str, int], dict]:
    """(model, depth) -> the config of its chosen cell at seeds[0], read back from the finished grid
    cells' results.json (nothing is trained): the cells the grads part looks at."""
    chosen = {}
    for depth in depths:
        for model in models:
            base = cell_config(config, model, depth)
            grid = []
            for lr in lr_grid(config, lrs):
                path = os.path.join(cell_dir(exercise, {**base, 'lr': lr, 'seed': seeds[0]}), 'results.json')
                if not os.path.exists(path):
                    raise UserError(f"{path} does not exist: run --part study with the same settings first")
                with open(path) as f:
                    grid.append({'lr': lr, 'best_val_acc': json.load(f)['best_val_acc']})
            chosen[model, depth] = {**config, 'lr': choose_lr(grid), 'seed': seeds[0]}
    return chosen


def clean_train(run_dir: str, data: Data) -> dict:
    """Loss and accuracy of the cell's best.pt on the whole training split, in eval mode, with plain
    cross-entropy and no augmentation: whether the net fitted its training data ("can it be
    optimised?"), which final_train_loss (a running mean over the last epoch, with dropout and
    label smoothing on) does not say cleanly."""
    model, _ = load_model(os.path.join(run_dir, 'checkpoints', 'best.pt'))
    train = evaluate(model.to(data.train.y.device), dataclasses.replace(data.train, augment=None))
    return {'clean_train_loss': train['loss'], 'clean_train_acc': train['acc']}


def run_parts(exercise: str, config: dict, study: dict, build_model: BuildModel, title: str,
              xlabel: str = 'depth (hidden layers)') -> None:
    """The 'study' and 'grads' parts of exercises 1.2 and 1.3 (config['part'] picks them).

    study: the seeded study (run_seeded_study) of `study` (the exercise's config with its study
    width and epochs, study_config) over config['depths'], config['study_seeds'] and
    config['study_lrs'] -> runs/<exercise>/study.csv (one row per cell), study_summary.csv and
    study.json (both tables: a record docs can cite), study_acc.png (mean and min-max over seeds),
    study_loss.png; the tables also to TensorBoard (runs/<exercise>/study/) and W&B (wandb.Tables 'study'
    and 'summary_over_seeds').
    grads: per-layer gradient norms, at init and trained, of each (model, depth)'s chosen cell at
    its first seed -> grad_norms.png.
    Under torchrun, rank 0 alone prints and writes: the process group is joined here, because a
    study whose cells are all finished (or the grads part alone) starts no run that would join it.
    """
    init_distributed(pick_device(config['device']))
    out_dir = os.path.join(config['runs_dir'], exercise)
    seeds, lrs = config['study_seeds'], config['study_lrs']
    check_grid(seeds, lrs)
    wrote = []  # one line at the end names every file written
    if config['part'] in ('study', 'all'):
        rows, summary = run_seeded_study(exercise, study, build_model, depths=config['depths'], seeds=seeds, lrs=lrs)
        if is_main():  # under torchrun every process trains, rank 0 writes
            wrote += write_study(exercise, study, rows, summary, out_dir, title, xlabel)
    if config['part'] in ('grads', 'all'):  # why: gradient norms per layer on one training batch
        cells = chosen_cells(exercise, study, ('plain', 'residual'), config['depths'], seeds, lrs)
        records = [r for (model, depth), cell in cells.items()
                   for r in gradient_study(exercise, cell, build_model, models=[model], depths=[depth])]
        if is_main():
            print_grad_summary(records)
            save_figure(plot_grad_norms(records, title=f'||dL/dW|| * ||W|| per layer, one batch ({title})'),
                        os.path.join(out_dir, 'grad_norms.png'))
            wrote.append('grad_norms.png')
    if wrote:
        print(f"wrote {out_dir}/{', '.join(wrote[:-1])}{' and ' if len(wrote) > 1 else ''}{wrote[-1]}")


def write_study(exercise: str, study: dict, rows: list[dict], summary: list[dict], out_dir: str, title: str,
                xlabel: str) -> list[str]:
    """The seeded study's tables, record and figures in out_dir. Returns the file names."""
    table = [{c: r[c] for c in CSV_COLUMNS} for r in rows]
    write_csv(rows, os.path.join(out_dir, 'study.csv'))
    write_csv(summary, os.path.join(out_dir, 'study_summary.csv'), SUMMARY_COLUMNS)
    settings = {k: v for k, v in identity(study).items() if k not in ('model', 'depth', 'lr', 'seed')}
    record = {'settings': settings, 'rows': table, 'summary': summary}  # what a doc cites (report.py --record)
    atomic_write(os.path.join(out_dir, 'study.json'), lambda f: json.dump(record, f, indent=1), binary=False)
    log_tables(exercise, study, os.path.join(out_dir, 'study'), {'study': table, 'summary_over_seeds': summary})
    chosen = [r for r in rows if r['chosen']]
    save_figure(plot_study(chosen, title=f'test accuracy ({title})', xlabel=xlabel),
                os.path.join(out_dir, 'study_acc.png'))
    save_figure(plot_loss_curves(chosen, title=f'training loss ({title})'), os.path.join(out_dir, 'study_loss.png'))
    return ['study.csv', 'study_summary.csv', 'study.json', 'study_acc.png', 'study_loss.png']


def study_row(run_dir: str, cell: dict) -> dict:
    """The CSV row (plus 'history') of a finished cell, read back from its files. The cell's own
    config must have the identity `cell` asks for: a row never describes other settings."""
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    ckpt = checkpoint.load(os.path.join(run_dir, 'checkpoints', 'last.pt'))
    config, history = ckpt.config, ckpt.history
    if cell_id(config) != cell_id(cell):
        raise UserError(f"{run_dir} holds a cell trained with other settings (cell {cell_id(config)}, "
                        f"expected {cell_id(cell)}); move it away and run the study again")
    return {'model': config['model'], 'depth': config['depth'], 'width': config.get('width', config.get('widths', '')),
            'lr': config['lr'], 'seed': config['seed'], 'params': results['num_params'], 'best_val_acc': results['best_val_acc'],
            'test_acc': results['test_acc'], 'final_train_loss': history[-1]['train/loss'],
            'train_seconds': results['train_seconds'], 'cell': os.path.basename(run_dir), 'history': history}


def write_csv(rows: list[dict], path: str, columns: Sequence[str] = CSV_COLUMNS) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue()), binary=False)


# ---------------------------------------------------------------------------------------------
# Gradients

def grad_norms(model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> list[dict]:
    """Per Linear and Conv2d, in module order, L = cross_entropy(model(x), y, label_smoothing):
      'grad'        ||dL/dW||, the raw norm
      'weight'      ||W||
      'ratio'       ||dL/dW|| / ||W||: an SGD step's size relative to the weight, per unit lr
      'scale_free'  ||dL/dW|| * ||W||: the loss's sensitivity to a *relative* change of W.
    Where a normalisation follows W the loss ignores W's scale: scaling W by c divides the raw
    norm by c and the ratio by c^2 (the effective learning rate falls), while scale_free stays
    put. So scale_free is the one that compares layers (of any shape, with or without BatchNorm)
    fairly. Uses the model's current mode (train/eval) and leaves every .grad untouched.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss, [m.weight for _, m in layers])
    rows = []
    for (name, m), g in zip(layers, grads):
        grad, weight = g.norm().item(), m.weight.detach().norm().item()
        rows.append({'layer': name, 'grad': grad, 'weight': weight,
                     'ratio': grad / weight if weight else math.inf, 'scale_free': grad * weight})
    return rows


def gradient_study(exercise: str, config: dict, build_model: BuildModel,
                   models: Sequence[str] = ('plain', 'residual'),
                   depths: Sequence[int] = (2, 4, 8, 16, 32, 64)) -> list[dict]:
    """Per-layer gradient norms on one fixed training batch, at initialisation and after training,
    with the loss the cells were trained with (label smoothing included), in train mode.

    The batch is the first config['batch_size'] training samples, unaugmented. 'init' rebuilds
    the model with the run's seed (the run's own initial weights); 'trained' loads the cell's
    best.pt. Returns records {'model', 'depth', 'stage': 'init' | 'trained', 'norms'}, norms as
    grad_norms returns them.
    """
    device = pick_device(config['device'])
    data = load_data(config, device)
    x = data.train.normalize(data.train.x[:config['batch_size']])  # (B, C, H, W) float
    y = data.train.y[:config['batch_size']]
    records = []
    for depth in depths:
        for model_name in models:
            best = os.path.join(cell_dir(exercise, cell_config(config, model_name, depth)), 'checkpoints', 'best.pt')
            if not os.path.exists(best):
                raise UserError(f"{best} does not exist: run --part study with the same settings first")
            trained, ckpt = load_model(best)
            torch.manual_seed(ckpt.config['seed'])  # as Run does before the script builds the model
            initial = build_model(ckpt.config, data)
            for stage, model in (('init', initial), ('trained', trained)):
                torch.manual_seed(0)  # same dropout masks, if any, for every model
                norms = grad_norms(model.to(device).train(), x, y, ckpt.config['label_smoothing'])
                records.append({'model': model_name, 'depth': depth, 'stage': stage, 'norms': norms})
    return records


def print_grad_summary(records: list[dict]) -> None:
    """One line per (model, depth): first and last layer's ||dL/dW|| * ||W|| and their ratio, init -> trained
    (raw norms and ratios per layer are in the records)."""
    cells: dict = {}
    for r in records:
        first, last = r['norms'][0]['scale_free'], r['norms'][-1]['scale_free']
        cells.setdefault((r['model'], r['depth']), []).append((first, last))
    print(f"{'model':>9} {'depth':>5}  |g|*|W| init -> trained: first layer, last layer, first/last")
    for (model, depth), stages in cells.items():
        columns = zip(*[(first, last, first / max(last, 1e-30)) for first, last in stages])  # (init, trained) each
        print(f"{model:>9} {depth:5d}" + ''.join(f"  {' -> '.join(f'{v:.1e}' for v in c):>18}" for c in columns))


# ---------------------------------------------------------------------------------------------
# Figures

def plot_study(rows: list[dict], metric: str = 'test_acc', title: str = '', xlabel: str = 'depth (hidden layers)'):
    """`metric` against depth (log2 axis), one line per model: the mean over the rows of each (model,
    depth) (one per seed), with error bars from their min to their max."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model in dict.fromkeys(r['model'] for r in rows):
        values: dict = {}
        for r in rows:
            if r['model'] == model:
                values.setdefault(r['depth'], []).append(100 * r[metric])
        depths = sorted(values)
        means = [statistics.fmean(values[d]) for d in depths]
        spread = [[m - min(values[d]) for d, m in zip(depths, means)], [max(values[d]) - m for d, m in zip(depths, means)]]
        seeds = sorted({len(v) for v in values.values()})
        label = model if seeds == [1] else f"{model} (mean, min-max of {'/'.join(map(str, seeds))} seeds)"
        ax.errorbar(depths, means, yerr=spread, marker='o', capsize=3, label=label)
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted({r['depth'] for r in rows}), [str(d) for d in sorted({r['depth'] for r in rows})])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f'{metric} (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curves(rows: list[dict], title: str = ''):
    """Training loss per epoch, one panel per depth, one colour per model (one line per seed)."""
    plt = pyplot()
    depths = sorted({r['depth'] for r in rows})
    models = list(dict.fromkeys(r['model'] for r in rows))
    fig, axes = plt.subplots(1, len(depths), figsize=(2.6 * len(depths), 3), sharey=True, squeeze=False)
    for ax, depth in zip(axes[0], depths):
        labelled = set()
        for r in (r for r in rows if r['depth'] == depth):
            ax.plot([h['epoch'] for h in r['history']], [h['train/loss'] for h in r['history']], marker='.',
                    color=f"C{models.index(r['model'])}", label=None if r['model'] in labelled else r['model'])
            labelled.add(r['model'])
        ax.set_title(f'depth {depth}')
        ax.set_xlabel('epoch')
        integer_ticks(ax)
        ax.set_yscale('log')
        plain_log_labels(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('train loss')
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_grad_norms(records: list[dict], title: str = ''):
    """||dL/dW|| * ||W|| (grad_norms' scale_free) by layer index (log scale): rows = stage (init,
    trained), columns = model, one line per depth."""
    plt = pyplot()
    stages = list(dict.fromkeys(r['stage'] for r in records))
    models = list(dict.fromkeys(r['model'] for r in records))
    depths = sorted({r['depth'] for r in records})
    colors = plt.cm.viridis([i / max(len(depths) - 1, 1) for i in range(len(depths))])
    fig, axes = plt.subplots(len(stages), len(models), figsize=(5 * len(models), 3.4 * len(stages)),
                             sharey=True, squeeze=False)
    for r in records:
        ax = axes[stages.index(r['stage'])][models.index(r['model'])]
        values = [max(n['scale_free'], 1e-30) for n in r['norms']]  # log axis: show exact zeros at the floor
        ax.plot(range(len(values)), values, color=colors[depths.index(r['depth'])], label=f"depth {r['depth']}")
    for i, stage in enumerate(stages):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.set_yscale('log')
            ax.set_title(f'{model}, {stage}')
            ax.set_xlabel('layer index (input -> classifier)')
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel('||dL/dW|| * ||W||')
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
