"""Evaluation, model loading and figures.

`evaluate(model, split)` -> loss, accuracy, per-class accuracy, confusion matrix.
`load_model(path, expect)` rebuilds a model from a checkpoint alone (checkpoint.rebuild_model).
`report(run, model, data, history)` runs the one test evaluation of a run, with its best-on-val
checkpoint, and writes results.json and the figures (through the run, like every file).

As a script: `python evaluate.py runs/exercise_1_1/<run>/checkpoints/best.pt` re-evaluates a
checkpoint on its test split and records it, with its provenance, in best.evaluation.json.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

import checkpoint
import models
from config import UserError, run_main
from device import all_reduce_sum, is_main, memory_format, rank_world, use_amp
from files import shown_path, write_json

if TYPE_CHECKING:
    from checkpoint import Checkpoint
    from dataset import Data, Split
    from record import Run


# ---------------------------------------------------------------------------------------------
# Metrics

@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1024, amp: bool = False,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Mean cross-entropy, accuracy, per-class accuracy and confusion matrix (rows: true class).
    amp: bf16 autocast on the split's device. Under torchrun each process evaluates every
    world-th sample and the sums are combined, so every process returns the whole split's numbers."""
    was_training = model.training
    model.eval()
    device = split.y.device
    rank, world = rank_world()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    num_classes = getattr(model, 'args', {}).get('num_classes') or int(model(split.normalize(split.x[:1])).shape[1])
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes ** 2, dtype=torch.long, device=device)
    order = torch.arange(rank, len(split), world, device=device) if world > 1 else None
    for x, y in split.batches(batch_size, order):
        with autocast:
            logits = model(x.contiguous(memory_format=memory_format))
        loss_sum += F.cross_entropy(logits.float(), y, reduction='sum')
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    model.train(was_training)
    all_reduce_sum(loss_sum)
    confusion = all_reduce_sum(confusion).view(num_classes, num_classes).cpu()
    n = max(len(split), 1)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {'loss': loss_sum.item() / n, 'acc': confusion.diag().sum().item() / n,
            'per_class_acc': per_class.tolist(), 'confusion': confusion}


# ---------------------------------------------------------------------------------------------
# Checkpoints

def load_model(path: str, expect: tuple[type[nn.Module], ...] = (), what: str = '') -> tuple[nn.Module, Checkpoint]:
    """(model with the checkpoint's weights, checkpoint.Checkpoint), rebuilt from the checkpoint alone;
    UserError (one line naming `what` the script expected) unless it is a model of this project of a
    class in `expect` (empty = any) whose weights fit. check_model_on_data then checks it on data."""
    return checkpoint.rebuild_model(path, expect, what)


def check_model_on_data(model: nn.Module, data: Data, path: str, what: str = '') -> None:
    """UserError unless `model` takes data's images and gives one score per class of data: a
    checkpoint of another data set or another head (2.2's background classifier) is refused
    before any work, in one line."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(data.test.normalize(data.test.x[:1]).to(next(model.parameters()).device))
    except RuntimeError:
        out = None
    model.train(was_training)
    if out is None or tuple(out.shape) != (1, data.num_classes):
        gives = 'no output' if out is None else f"{out.shape[-1]} scores"
        raise UserError(f"{path}: its {type(model).__name__} gives {gives} on {data.name}'s "
                        f"{'x'.join(map(str, data.shape))} images, which have {data.num_classes} classes"
                        + (f"; expected {what}" if what else ''))


# ---------------------------------------------------------------------------------------------
# Figures (drawn with pyplot(); written with files.save_figure or Run.log_figure)

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (runs need no display); imported lazily."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def integer_ticks(ax) -> None:
    """Whole numbers on the x axis (epochs): no 1.2, 1.4 on short runs."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plain_log_labels(ax) -> None:
    """A log y axis labelled 0.3, 0.5, 1 rather than 3x10^-1."""
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter('%.2g'))
    ax.yaxis.set_minor_formatter(FormatStrFormatter('%.2g'))


def plot_curves(history: list[dict], config: dict | None = None, title: str = ''):
    """Loss (log axis) and accuracy per epoch for train and val. The train curve is the running
    mean during the epoch, with whatever regularisers `config` turned on: the legend says which."""
    plt = pyplot()
    config = config or {}
    on = [name for name, key in (('dropout', 'dropout'), ('label smoothing', 'label_smoothing'),
                                 ('augmentation', 'augment')) if config.get(key)]
    train_label = 'train (running mean' + (f', {" and ".join(on)} on)' if on else ')')
    epochs = [h['epoch'] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ('loss', 'acc')):
        for split, label in (('train', train_label), ('val', 'val (eval mode)')):
            ax.plot(epochs, [h[f'{split}/{metric}'] for h in history], marker='.', label=label)
        ax.set_xlabel('epoch')
        ax.set_ylabel({'loss': 'cross-entropy (log)', 'acc': 'accuracy'}[metric])
        ax.grid(alpha=0.3)
        integer_ticks(ax)
    axes[0].set_yscale('log')
    plain_log_labels(axes[0])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=2, frameon=False)  # below the plots: covers no line
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_confusion(confusion: torch.Tensor, classes: list[str], title: str = ''):
    plt = pyplot()
    confusion = confusion.numpy()
    rates = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.55 * k + 2))
    ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if confusion[i, j]:
                ax.text(j, i, int(confusion[i, j]), ha='center', va='center', fontsize=7,
                        color='white' if rates[i, j] > 0.5 else 'black')
    ax.set_xticks(range(k), classes, rotation=45, ha='right', fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# End of a run

def report(run: Run, model: nn.Module, data: Data, history: list[dict]) -> dict:
    """Test the best-on-val checkpoint once; write results.json and figures; close the run."""
    best = checkpoint.load(run.path('checkpoints', 'best.pt'))
    model.load_state_dict(best.model_state)
    test = evaluate(model, data.test, amp=use_amp(run.device, run.config),
                    memory_format=memory_format(run.device, model, run.config))
    results = {
        'test_acc': test['acc'], 'test_loss': test['loss'],
        'best_val_acc': best.best_val_acc, 'best_epoch': best.best_epoch,
        'epochs_run': len(history), 'train_seconds': sum(h['train/epoch_seconds'] for h in history),  # validation included
        'num_params': models.num_params(model), 'dataset': data.name, 'device': str(run.device),
        'torch_version': torch.__version__, 'world_size': run.world,
        'per_class_acc': [round(a, 6) for a in test['per_class_acc']], **run.notes,
        'provenance': run.provenance(data),
    }
    if not is_main():
        run.finish()
        return results
    write_json(run.path('results.json'), results)
    run.log_figure('curves', plot_curves(history, run.config, f"{run.exercise}: {run.name}"))
    run.log_figure('confusion', plot_confusion(test['confusion'], data.classes,
                                               f"{data.name} test, acc {100 * test['acc']:.2f}%"))
    if not run.quiet:  # a study cell: training.cached_run prints its one line
        path = shown_path(run.path('results.json'))  # relative under the working directory: fits a screen
        print(f"test acc {100 * test['acc']:.2f}% (loss {test['loss']:.4f}) with best.pt from epoch "
              f"{best.best_epoch} (val acc {100 * best.best_val_acc:.2f}%) -> {path}")
    run.finish(results)
    return results


USAGE = """usage: python evaluate.py PATH/TO/checkpoint.pt

Rebuilds the model from the checkpoint alone and evaluates it on the test split of the data it
was trained on (the checkpoint's config: dataset, data_dir, val_split, subset)."""


def main(argv: list[str]) -> None:
    from dataset import load_data
    from device import pick_device
    from provenance import now, provenance
    if argv in (['-h'], ['--help']):
        print(USAGE)
        return
    if len(argv) != 1 or argv[0].startswith('-'):
        raise UserError("usage: python evaluate.py PATH/TO/checkpoint.pt (see --help)")
    started = now()
    what = "a classifier's checkpoint (best.pt or last.pt of exercise 1.1, 1.2, 1.3 or 2.2's classifier stage)"
    model, ckpt = load_model(argv[0], what=what)
    device = pick_device('auto')  # where it runs now, not where it trained: a CUDA run's checkpoint on a CPU box
    data = load_data(ckpt.config, device)
    check_model_on_data(model, data, argv[0], what)
    test = evaluate(model.to(device), data.test)
    print(f"{argv[0]}: {data.name} test acc {100 * test['acc']:.2f}% loss {test['loss']:.4f}")
    # the re-evaluation's own record, beside the checkpoint: best.pt -> best.evaluation.json
    path = os.path.splitext(argv[0])[0] + '.evaluation.json'
    try:
        write_json(path, {'checkpoint': os.path.abspath(argv[0]), 'test_acc': test['acc'], 'test_loss': test['loss'],
                          'per_class_acc': [round(a, 6) for a in test['per_class_acc']],
                          'provenance': provenance(device, 1, data, started)})
        print(f"-> {path}")
    except UserError as e:  # a read-only checkpoint folder (files.cannot_write): the printed line is the result
        print(f"warning: {e}; the result above is not recorded")


if __name__ == '__main__':
    run_main(main)
