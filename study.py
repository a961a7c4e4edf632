"""Depth studies: train a grid of (model, depth) runs, compare them, look at their gradients.

Shared by exercise 1.2 (MLP vs SkipMLP) and 1.3 (plain vs residual CNN). The exercise supplies
`build_model(config, data)`, which reads config['model'] and config['depth'] (and whatever
else it needs, e.g. config['width']); everything else is here:

    rows = run_study('exercise_1_2', config, build_model, depths=[2, 4, 8])  # trains or skips
    write_csv(rows, 'runs/exercise_1_2/study.csv')
    save_figure(plot_study(rows), 'runs/exercise_1_2/study_acc.png')
    save_figure(plot_loss_curves(rows), 'runs/exercise_1_2/study_loss.png')
    records = gradient_study('exercise_1_2', config, build_model, depths=[2, 4, 8])
    save_figure(plot_grad_norms(records), 'runs/exercise_1_2/grad_norms.png')

Every cell is an ordinary run (Run -> load_data -> build_model -> train -> report) named
study-<model>-d<depth>-<id>, where <id> is a hash of every setting that shapes the cell's result
(cell_id: data, model, optimisation, seed... all but where and how it runs and logs). Running
the same study again skips cells whose results.json exists and resumes a cell whose
checkpoints/last.pt exists; a study with another width, lr or dataset gets cells of its own, so
a table or a plot never mixes cells trained with different settings.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
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

CSV_COLUMNS = ['model', 'depth', 'width', 'params', 'best_val_acc', 'test_acc', 'final_train_loss',
               'clean_train_loss', 'clean_train_acc', 'train_seconds', 'cell']


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
    """Train every (model, depth) cell with `config`, skipping finished cells, resuming broken ones.

    A cell's config is `config` with model, depth, run_name and resume set; a resumed cell
    continues with its checkpoint's config. Returns one row per cell: the CSV_COLUMNS plus
    'history' (the per-epoch rows of train()).
    """
    rows, data = [], None
    for depth in depths:
        for model in models:
            cell = cell_config(config, model, depth)
            run_dir, _ = cached_run(exercise, cell, os.path.basename(cell_dir(exercise, cell)), build_model, quiet=True)
            data = data or load_data(config, pick_device(config['device']))
            rows.append({**study_row(run_dir, cell), **clean_train(run_dir, data)})
    return rows


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

    study: every cell of `study` (the exercise's config with its study width and epochs) over
    config['depths'] -> runs/<exercise>/study.csv, study_acc.png, study_loss.png; the table also
    to TensorBoard (runs/<exercise>/study/) and W&B (a wandb.Table).
    grads: per-layer gradient norms of those cells at init and trained -> grad_norms.png.
    Under torchrun, rank 0 alone prints and writes: the process group is joined here, because a
    study whose cells are all finished (or the grads part alone) starts no run that would join it.
    """
    init_distributed(pick_device(config['device']))
    out_dir = os.path.join(config['runs_dir'], exercise)
    wrote = []  # one line at the end names every file written
    if config['part'] in ('study', 'all'):
        rows = run_study(exercise, study, build_model, depths=config['depths'])
        if not is_main():  # under torchrun every process trains, rank 0 writes
            rows = []
    if config['part'] in ('study', 'all') and rows:
        write_csv(rows, os.path.join(out_dir, 'study.csv'))
        log_tables(exercise, study, os.path.join(out_dir, 'study'),
                   {'study': [{c: r[c] for c in CSV_COLUMNS} for r in rows]})
        save_figure(plot_study(rows, title=f'test accuracy ({title})', xlabel=xlabel),
                    os.path.join(out_dir, 'study_acc.png'))
        save_figure(plot_loss_curves(rows, title=f'training loss ({title})'), os.path.join(out_dir, 'study_loss.png'))
        wrote += ['study.csv', 'study_acc.png', 'study_loss.png']
    if config['part'] in ('grads', 'all'):  # why: gradient norms per layer on one training batch
        records = gradient_study(exercise, study, build_model, depths=config['depths'])
        if is_main():
            print_grad_summary(records)
            save_figure(plot_grad_norms(records, title=f'||dL/dW|| * ||W|| per layer, one batch ({title})'),
                        os.path.join(out_dir, 'grad_norms.png'))
            wrote.append('grad_norms.png')
    if wrote:
        print(f"wrote {out_dir}/{', '.join(wrote[:-1])}{' and ' if len(wrote) > 1 else ''}{wrote[-1]}")


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
            'params': results['num_params'], 'best_val_acc': results['best_val_acc'],
            'test_acc': results['test_acc'], 'final_train_loss': history[-1]['train/loss'],
            'train_seconds': results['train_seconds'], 'cell': os.path.basename(run_dir), 'history': history}


def write_csv(rows: list[dict], path: str) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, extrasaction='ignore', lineterminator='\n')
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
    """`metric` against depth (log2 axis), one line per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model in dict.fromkeys(r['model'] for r in rows):
        mine = sorted((r for r in rows if r['model'] == model), key=lambda r: r['depth'])
        ax.plot([r['depth'] for r in mine], [100 * r[metric] for r in mine], marker='o', label=model)
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
    """Training loss per epoch, one panel per depth, one line per model."""
    plt = pyplot()
    depths = sorted({r['depth'] for r in rows})
    fig, axes = plt.subplots(1, len(depths), figsize=(2.6 * len(depths), 3), sharey=True, squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for r in (r for r in rows if r['depth'] == depth):
            ax.plot([h['epoch'] for h in r['history']], [h['train/loss'] for h in r['history']],
                    marker='.', label=r['model'])
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
