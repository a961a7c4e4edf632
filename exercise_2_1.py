"""Exercise 2.1 — why residual connections work, shown four ways on the depth-study cells.

The lab asks why residual connections are effective. This script takes the plain and residual
cells of exercise 1.2's study (MLPs, --study mlp) or 1.3's (CNNs, --study cnn), with exactly
their settings: finished cells are reused, missing ones are trained by study.run_study (the
same cells, the same names). Four analyses, chosen with --part:

  grads       ||dL/dW|| * ||W|| per layer (raw norms beside it) at initialisation and after
              training, with the loss the cells were trained with (study.gradient_study)
  lesion      delete one block at test time, then k random blocks (Veit et al. 2016): a residual
              net keeps its identity path, a plain block becomes the identity
  landscape   training loss along random filter-normalised directions, 1-D and 2-D (Li et al.
              2018), at `landscape_depths`; 'rise' = mean loss increase at a fixed step
  shattering  d logit / dt along lines between test images, and its autocorrelation, at init
              and after training (Balduzzi et al. 2017)

Output: <runs_dir>/exercise_2_1/<study>-<id>/results.json (one entry per part, kept across
runs of other parts; <id> the hash of the study settings, as the cells') and its figures.
Measured results, data and hardware: docs/exercise_2_1.md.

    python exercise_2_1.py --dataset fashion_mnist --subset 20000      # the 1.2 cells, all parts
    python exercise_2_1.py --part lesion --depths "[16]"
    python exercise_2_1.py --study cnn --subset 10000 --depths "[1,2,4]" \\
        --settings "{'study_widths': [16, 32, 64], 'study_epochs': 8, 'batch_size': 256, 'lr': 0.1}"
    python exercise_2_1.py --smoke True                                # seconds: digits, tiny nets
"""
from __future__ import annotations

import json
import os

import torch

import exercise_1_2
import exercise_1_3
from analysis import head, landscape, lesion_study, shattering, calibrate_batchnorm
from config import UserError, cli
from dataset import load_data
from evaluate import load_model, pyplot
from device import pick_device
from files import save_figure, write_json
from study import cell_config, cell_dir, cell_id, gradient_study, plot_grad_norms, print_grad_summary, run_study

EXERCISE = 'exercise_2_1'
PARTS = ('grads', 'lesion', 'landscape', 'shattering')
STUDIES = {'mlp': exercise_1_2, 'cnn': exercise_1_3}
MODELS = ('plain', 'residual')

config = {
    'part': 'all',                  # grads | lesion | landscape | shattering | all
    'study': 'mlp',                 # mlp: exercise 1.2's cells (MLP / SkipMLP) | cnn: exercise 1.3's (plain / residual CNN)
    'settings': {},                 # keys of that exercise's config for its study cells, e.g. {'study_epochs': 5}; its defaults otherwise
    'depths': [],                   # depths analysed (cells trained if missing); [] = the exercise's study depths
    'landscape_depths': [],         # depths of the landscape part (slow: 1-D + 2-D slices); [] = middle and deepest of depths
    # data and system, handed to the study cells (the settings above may not repeat them)
    'dataset': 'fashion_mnist',     # mnist | fashion_mnist | digits (| cifar10 for --study cnn)
    'subset': 20000,                # at most this many samples per split, as the cells' subset (0 = all)
    'data_dir': exercise_1_2.config['data_dir'],  # torchvision layout; env DLA_DATA overrides
    'device': 'auto',               # auto = cuda, then mps, then cpu
    'runs_dir': './runs',           # cells in runs/exercise_1_x/, analyses in runs/exercise_2_1/
    'wandb': 'off',                 # online | offline | off, for cells trained here
    # analyses
    'seed': 0,                      # draws of the analyses: lesioned blocks, directions, lines (not the cells' seed)
    'samples': 2000,                # test images per lesion evaluation (the first ones)
    'lesion_draws': 5,              # random sets of k deleted blocks averaged per k
    'landscape_samples': 1000,      # training images per landscape loss (the first ones)
    'landscape_dirs': 3,            # 1-D slices, each along its own direction
    'landscape_points': 21,         # steps of each 1-D slice in [-1, 1] (filter-normalised units)
    'landscape_grid': 11,           # the 2-D slice: grid x grid losses in [-1, 1]^2
    'lines': 8,                     # shattering: lines between pairs of test images, averaged
    'line_points': 256,             # shattering: gradients per line, as Balduzzi et al.
    'max_lag': 32,                  # shattering: autocorrelation lags 0..max_lag
    'smoke': False,                 # seconds on a CPU: digits, width 16 / widths [4, 8, 8], 1 epoch, depths [2, 4] / [1, 2], few samples
}
# passed on to the cells (the settings key may not set them: one place per key)
TO_CELLS = ('dataset', 'subset', 'data_dir', 'device', 'runs_dir', 'wandb')
SMOKE = {'dataset': 'digits', 'subset': 256, 'samples': 64, 'landscape_samples': 64, 'landscape_dirs': 1,
         'landscape_points': 3, 'landscape_grid': 3, 'lines': 2, 'line_points': 16, 'max_lag': 4}
SMOKE_SETTINGS = {'mlp': {'study_width': 16, 'study_epochs': 1, 'max_steps': 3, 'depths': [2, 4]},
                  'cnn': {'study_widths': [4, 8, 8], 'study_epochs': 1, 'max_steps': 2, 'batch_size': 32,
                          'depths': [1, 2]}}


def study_settings(config: dict) -> tuple[dict, list[int]]:
    """(the cells' shared config, exactly as exercise 1.2 / 1.3 builds it, and the depths)."""
    module = STUDIES[config['study']]
    settings = {**(SMOKE_SETTINGS[config['study']] if config['smoke'] else {}), **config['settings']}
    unknown = sorted(set(settings) - set(module.config))
    if unknown:
        raise UserError(f"--settings: {', '.join(unknown)} not in {module.EXERCISE}.py's config (see its --help)")
    repeated = sorted(set(settings) & set(TO_CELLS))
    if repeated:
        raise UserError(f"--settings: give {', '.join(repeated)} as their own keys (--{repeated[0]} ...)")
    base = {**module.config, **settings, **{k: config[k] for k in TO_CELLS}}
    depths = config['depths'] or base['depths']
    return module.study_config(base), depths


def out_dir_of(config: dict, study: dict) -> str:
    """<runs_dir>/exercise_2_1/<study>-<hash of the cells' shared settings>: one folder per set of cells."""
    shared = {k: v for k, v in study.items() if k not in ('model', 'depth')}
    return os.path.join(config['runs_dir'], EXERCISE, f"{config['study']}-{cell_id(shared)}")


def main(config: dict, overrides: dict) -> None:
    if config['smoke']:
        config = {**config, **{k: v for k, v in SMOKE.items() if k not in overrides}}
    module = STUDIES[config['study']]
    study, depths = study_settings(config)
    parts = PARTS if config['part'] == 'all' else (config['part'],)
    ldepths = config['landscape_depths'] or sorted({depths[len(depths) // 2], depths[-1]})
    if not set(ldepths) <= set(depths):
        raise UserError(f"--landscape_depths {ldepths} must be among --depths {depths}")
    device = pick_device(config['device'])

    rows = run_study(module.EXERCISE, study, module.build_model, depths=depths)  # reuse or train
    out = out_dir_of(config, study)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, 'results.json')
    results = {}
    if os.path.exists(path):  # the parts of earlier runs on the same cells stay
        with open(path) as f:
            results = json.load(f)
    cells = {f"{r['model']}-d{r['depth']}": {k: r[k] for k in ('cell', 'test_acc', 'clean_train_loss', 'clean_train_acc',
                                                                 'params')} for r in rows}
    results.update({'study': config['study'], 'exercise': module.EXERCISE,
                    'cells': {**results.get('cells', {}), **cells},  # every cell any part has analysed
                    'study_config': {k: v for k, v in study.items() if k not in ('runs_dir', 'data_dir')}})
    data = load_data(study, device)
    generator = torch.Generator().manual_seed(config['seed'])
    trained = {(m, d): load_model(os.path.join(cell_dir(module.EXERCISE, cell_config(study, m, d)),
                                               'checkpoints', 'best.pt'))[0].to(device).eval()
               for d in depths for m in MODELS}
    title = f"{study['dataset']}, {config['study']} study"

    if 'grads' in parts:
        records = gradient_study(module.EXERCISE, study, module.build_model, depths=depths)
        print_grad_summary(records)
        results['grads'] = records
        save_figure(plot_grad_norms(records, title=f'||dL/dW|| * ||W|| per layer, one batch ({title})'),
                    os.path.join(out, 'grad_norms.png'))

    if 'lesion' in parts:
        test = head(data.test, config['samples'])
        results['lesion'] = {m: {str(d): lesion_study(trained[m, d], test, config['lesion_draws'], generator)
                                 for d in depths} for m in MODELS}
        print_lesion(results['lesion'])
        save_figure(plot_lesion(results['lesion'], title), os.path.join(out, 'lesion.png'))

    if 'landscape' in parts:
        train = head(data.train, config['landscape_samples'])
        results['landscape'] = {m: {str(d): landscape(trained[m, d], train, config['landscape_dirs'],
                                                      config['landscape_points'], config['landscape_grid'], generator)
                                    for d in ldepths} for m in MODELS}
        for m in MODELS:
            for d, r in results['landscape'][m].items():
                print(f"landscape {m:>8} depth {d:>3}: loss {r['loss0']:.4f}, mean rise at step 0.5 "
                      f"{r['rise'].get('0_5', float('nan')):.4f}, at 1 {r['rise']['1']:.4f}")
        save_figure(plot_landscape_1d(results['landscape'], title), os.path.join(out, 'landscape_1d.png'))
        save_figure(plot_landscape_2d(results['landscape'], title), os.path.join(out, 'landscape_contour.png'))
        save_figure(plot_landscape_2d(results['landscape'], title, surface=True),
                    os.path.join(out, 'landscape_surface.png'))

    if 'shattering' in parts:
        test = head(data.test, 2 * config['lines'])
        calibration = data.train.normalize(data.train.x[:study['batch_size']])
        results['shattering'] = {}
        for stage in ('init', 'trained'):
            results['shattering'][stage] = {m: {} for m in MODELS}
            for d in depths:
                for m in MODELS:
                    model = trained[m, d]
                    if stage == 'init':  # the cell's own initial weights, as gradient_study rebuilds them
                        cell = cell_config(study, m, d)
                        torch.manual_seed(cell['seed'])
                        model = module.build_model(cell, data).to(device)
                        calibrate_batchnorm(model, calibration)
                    results['shattering'][stage][m][str(d)] = shattering(
                        model, test, config['lines'], config['line_points'], config['max_lag'])
        print_shattering(results['shattering'])
        save_figure(plot_shattering(results['shattering'], title), os.path.join(out, 'shattering.png'))

    results['config'] = {k: v for k, v in config.items() if k not in ('runs_dir', 'data_dir')}
    write_json(path, results)
    print(f"wrote {path} and its figures")


# ---------------------------------------------------------------------------------------------
# Printed summaries

def print_lesion(lesion: dict) -> None:
    print(f"{'model':>9} {'depth':>5} {'intact':>7} {'one block: mean':>15} {'min':>6}   k blocks: mean acc")
    for m, by_depth in lesion.items():
        for d, r in by_depth.items():
            ks = '  '.join(f"{k}: {100 * a:.1f}" for k, a in r['k_blocks'].items())
            one = r['one_block'] or [float('nan')]
            print(f"{m:>9} {d:>5} {100 * r['intact']:7.2f} {100 * sum(one) / len(one):15.2f} {100 * min(one):6.2f}   {ks}")


def print_shattering(shatter: dict) -> None:
    for stage, by_model in shatter.items():
        for m, by_depth in by_model.items():
            print(f"shattering {stage:>7} {m:>8}: lag-1 autocorrelation by depth "
                  + '  '.join(f"{d}: {r['lag1']:.3f}" for d, r in by_depth.items()))


# ---------------------------------------------------------------------------------------------
# Figures

def plot_lesion(lesion: dict, title: str):
    """Left: accuracy with one block deleted, by block position. Right: mean accuracy with k random
    blocks deleted. Solid residual, dashed plain, one colour per depth."""
    plt = pyplot()
    depths = sorted({int(d) for by_depth in lesion.values() for d in by_depth})
    colors = dict(zip(depths, plt.cm.viridis([i / max(len(depths) - 1, 1) for i in range(len(depths))])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, style in (('plain', '--'), ('residual', '-')):
        for d, r in lesion.get(m, {}).items():
            n = len(r['one_block'])
            left.plot([(i + 0.5) / max(n, 1) for i in range(n)], [100 * a for a in r['one_block']], style,
                      marker='.', color=colors[int(d)], label=f'{m} {d}')
            ks = [int(k) for k in r['k_blocks']]
            right.plot(ks, [100 * a for a in r['k_blocks'].values()], style, marker='o', color=colors[int(d)],
                       label=f'{m} {d}')
    left.set_xlabel('position of the deleted block (0 = input, 1 = output)')
    left.set_ylabel('test accuracy (%)')
    left.set_title('one block deleted')
    right.set_xscale('log', base=2)
    right.set_xlabel('blocks deleted (k, random)')
    right.set_title('k random blocks deleted (mean)')
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f'lesion study ({title}); solid residual, dashed plain')
    fig.tight_layout()
    return fig


def plot_landscape_1d(land: dict, title: str):
    """Training loss along each 1-D direction, one panel per depth, plain and residual together."""
    plt = pyplot()
    depths = sorted({int(d) for by_depth in land.values() for d in by_depth})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.5), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], depths):
        for m, color in (('plain', 'C0'), ('residual', 'C1')):
            r = land[m][str(d)]
            for i, curve in enumerate(r['curves']):
                ax.plot(r['alphas'], curve, color=color, alpha=0.8, label=m if i == 0 else None)
        ax.set_yscale('log')
        ax.set_title(f'depth {d}')
        ax.set_xlabel('step along a filter-normalised direction')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('training loss')
    axes[0][0].legend()
    fig.suptitle(f'1-D loss slices ({title})')
    fig.tight_layout()
    return fig


def plot_landscape_2d(land: dict, title: str, surface: bool = False):
    """The 2-D slice of each (model, depth): contour lines of the loss (log-spaced, from the lowest loss
    to 10^4 x it), or a 3-D surface of log10 loss."""
    import numpy as np
    from matplotlib.colors import LogNorm
    plt = pyplot()
    depths = sorted({int(d) for by_depth in land.values() for d in by_depth})
    fig = plt.figure(figsize=(4.2 * len(depths), 7.6))
    for i, m in enumerate(MODELS):
        for j, d in enumerate(depths):
            r = land[m][str(d)]
            a = np.array(r['axis'])
            X, Y = np.meshgrid(a, a)
            Z = np.array(r['surface'])
            if surface:
                ax = fig.add_subplot(2, len(depths), i * len(depths) + j + 1, projection='3d')
                ax.plot_surface(X, Y, np.log10(Z), cmap='viridis', linewidth=0)
                ax.set_zlabel('log10 loss')
            else:
                ax = fig.add_subplot(2, len(depths), i * len(depths) + j + 1)
                low = max(Z.min(), 1e-3)  # levels up to 10^4 x the lowest loss: plain nets reach 10^20
                levels = np.geomspace(low, max(min(Z.max(), 1e4 * low), 1.01 * low), 13)
                cs = ax.contour(X, Y, Z, levels=levels, cmap='viridis', norm=LogNorm())
                ax.clabel(cs, fontsize=6, fmt='%.2g')
                ax.plot(0, 0, 'k+')
                ax.set_aspect('equal')
            ax.set_title(f'{m}, depth {d}')
    fig.suptitle(f"2-D loss slices ({title}){'; z = log10 loss' if surface else ''}")
    fig.tight_layout()
    return fig


def plot_shattering(shatter: dict, title: str):
    """Top: g(t) on the first line at the deepest depth (normalised), init and trained. Bottom left:
    lag-1 autocorrelation by depth; bottom right: rho(k) at the deepest depth."""
    plt = pyplot()
    depths = sorted({int(d) for by_model in shatter.values() for by_depth in by_model.values() for d in by_depth})
    deep = str(depths[-1])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, stage in zip(axes[0], ('init', 'trained')):
        for m, color in (('plain', 'C0'), ('residual', 'C1')):
            g = shatter[stage][m][deep]['example']
            ax.plot([t / max(len(g) - 1, 1) for t in range(len(g))], g, color=color, lw=0.8, label=m)
        ax.set_title(f'd logit / dt along one line, depth {deep}, {stage}')
        ax.set_xlabel('t (image a -> image b)')
        ax.legend(fontsize=7)
    for stage, style in (('init', '--'), ('trained', '-')):
        for m, color in (('plain', 'C0'), ('residual', 'C1')):
            by_depth = shatter[stage][m]
            axes[1][0].plot(depths, [by_depth[str(d)]['lag1'] for d in depths], style, marker='o', color=color,
                            label=f'{m}, {stage}')
            rho = by_depth[deep]['autocorr']
            axes[1][1].plot(range(len(rho)), rho, style, color=color, label=f'{m}, {stage}')
    axes[1][0].set_xscale('log', base=2)
    axes[1][0].set_xlabel('depth')
    axes[1][0].set_ylabel('lag-1 autocorrelation')
    axes[1][1].set_xlabel('lag (steps along the line)')
    axes[1][1].set_ylabel(f'autocorrelation, depth {deep}')
    for ax in axes[1]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'shattered gradients ({title}); 1 = brown noise, 0 = white noise')
    fig.tight_layout()
    return fig


if __name__ == '__main__':
    cli(main, config, choices={'part': (*PARTS, 'all'), 'study': tuple(STUDIES),
                               'dataset': ('mnist', 'fashion_mnist', 'digits', 'cifar10'),
                               'wandb': ('online', 'offline', 'off')})
