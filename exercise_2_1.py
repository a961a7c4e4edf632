"""Exercise 2.1 — why residual connections work, shown four ways on the depth-study cells.

Takes the plain and residual cells of exercise 1.2's study (--study mlp) or 1.3's (--study cnn)
with exactly their settings (finished cells reused, missing ones trained by study.run_study) and
runs four analyses (--part; analysis.py): gradient norms per layer, lesions (Veit et al. 2016),
loss-landscape slices (Li et al. 2018) and shattered gradients (Balduzzi et al. 2017), and their
controls (controls.py: the same nets at init without the residual branch scaling, or orthogonal). Writes
<runs_dir>/exercise_2_1/<study>-<id>/results.json (one entry per part, kept across runs of other
parts) and one figure per part. What each analysis measures, and the results: docs/exercise_2_1.md.

    python exercise_2_1.py --dataset fashion_mnist --subset 20000      # the 1.2 cells, all parts
    python exercise_2_1.py --part lesion --depths "[16]"
    python exercise_2_1.py --study cnn --subset 10000 --depths "[1,2,4]" \\
        --settings "{'study_widths': [16, 32, 64], 'study_epochs': 8, 'batch_size': 256, 'lr': 0.1}"
    python exercise_2_1.py --smoke True                                # seconds: digits, tiny nets
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import nn

import exercise_1_2
import exercise_1_3
from analysis import (batchnorms, calibrate_batchnorm, head, landscape, lesion_study, plot_grad_profiles,
                      plot_landscape_1d, plot_landscape_2d, plot_lesion, plot_shattering, shattering)
from config import UserError, cli
from controls import branch_ratios, orthogonal_init, plot_controls, unscale_branches
from dataset import Data, dataset_names, load_data
from device import pick_device
from evaluate import load_model
from files import save_figure, write_json
from study import cell_config, cell_dir, cell_id, grad_norms, gradient_study, print_grad_summary, run_study

EXERCISE = 'exercise_2_1'
PARTS = ('grads', 'lesion', 'landscape', 'shattering', 'controls')
STUDIES = {'mlp': exercise_1_2, 'cnn': exercise_1_3}
MODELS = ('plain', 'residual')

config = {
    'part': 'all',                  # grads | lesion | landscape | shattering | controls | all
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
    'ratio_samples': 500,           # validation images for ||branch(x)|| / ||x|| per residual block
    'bn_samples': 512,              # training images that re-estimate BatchNorm statistics after a lesion
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
SMOKE = {'dataset': 'digits', 'subset': 256, 'samples': 64, 'ratio_samples': 32, 'bn_samples': 32,
         'landscape_samples': 64, 'landscape_dirs': 1,
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


@dataclass
class Cells:
    """The trained plain and residual cells being analysed, and what every analysis needs beside them."""
    module: ModuleType              # exercise_1_2 or exercise_1_3: its build_model and EXERCISE
    study: dict                     # the cells' shared config
    depths: list[int]
    landscape_depths: list[int]
    data: Data
    trained: dict[tuple[str, int], nn.Module]  # (model, depth) -> the cell's best.pt, eval mode
    configs: dict[tuple[str, int], dict]       # (model, depth) -> the config in that checkpoint
    generator: torch.Generator      # the analyses' draws (config['seed'])
    title: str                      # figure titles: dataset and study
    out: str                        # the folder of results.json and the figures


def load_cells(config: dict, study: dict, depths: list[int], landscape_depths: list[int]) -> tuple[Cells, dict]:
    """Trains the missing cells (study.run_study), loads every cell's best.pt; returns them and the
    cells' summary rows {'<model>-d<depth>': {...}} for results.json."""
    module = STUDIES[config['study']]
    device = pick_device(config['device'])
    rows = run_study(module.EXERCISE, study, module.build_model, depths=depths)  # reuse or train
    summary = {f"{r['model']}-d{r['depth']}": {k: r[k] for k in ('cell', 'test_acc', 'clean_train_loss',
                                                                   'clean_train_acc', 'params')} for r in rows}
    data = load_data(study, device)
    generator = torch.Generator().manual_seed(config['seed'])
    checkpoints = {(m, d): load_model(os.path.join(cell_dir(module.EXERCISE, cell_config(study, m, d)),
                                                   'checkpoints', 'best.pt')) for d in depths for m in MODELS}
    trained = {key: model.to(device).eval() for key, (model, _) in checkpoints.items()}
    configs = {key: ckpt.config for key, (_, ckpt) in checkpoints.items()}
    cells = Cells(module, study, depths, landscape_depths, data, trained, configs, generator,
                  f"{study['dataset']}, {config['study']} study", out_dir_of(config, study))
    return cells, summary


# ---------------------------------------------------------------------------------------------
# The analyses: each returns its record and saves its figures in cells.out

def initial_model(cells: Cells, model: str, depth: int, change: Callable[[nn.Module], nn.Module] | None = None
                  ) -> nn.Module:
    """The cell's own initial weights, rebuilt from its checkpoint's config and seed (as gradient_study
    does), `change` applied (a control's init), BatchNorm statistics from the first training batch; eval mode."""
    cell = cells.configs[model, depth]
    torch.manual_seed(cell['seed'])  # as Run does before the script builds the model
    net = cells.module.build_model(cell, cells.data).to(cells.data.train.x.device)
    if change is not None:
        change(net)
    train = cells.data.train
    calibrate_batchnorm(net, train.normalize(train.x[:cells.study['batch_size']]))
    return net.eval()


def analyse_grads(cells: Cells, config: dict) -> list[dict]:
    records = gradient_study(cells.module.EXERCISE, cells.study, cells.module.build_model, depths=cells.depths)
    print_grad_summary(records)
    save_figure(plot_grad_profiles(records, title=f'||dL/dW|| * ||W|| per layer, one batch ({cells.title})'),
                os.path.join(cells.out, 'grad_norms.png'))
    return records


def analyse_lesion(cells: Cells, config: dict) -> dict:
    """Lesions of the trained cells; BatchNorm nets also with statistics re-estimated after each lesion;
    residual cells also ||branch(x)|| / ||x|| per block on validation images."""
    test, train, val = head(cells.data.test, config['samples']), cells.data.train, cells.data.val
    bn_batch = train.normalize(train.x[:config['bn_samples']])
    ratio_batch = val.normalize(val.x[:config['ratio_samples']])
    record: dict = {m: {} for m in MODELS}
    for m in MODELS:
        for d in cells.depths:
            net = cells.trained[m, d]
            r = lesion_study(net, test, config['lesion_draws'], cells.generator,
                             calibration=bn_batch if batchnorms(net) else None)
            if m == 'residual':
                r['branch_ratio'] = branch_ratios(net, ratio_batch)
                r['ratio_samples'] = len(ratio_batch)
            record[m][str(d)] = r
    print_lesion(record)
    save_figure(plot_lesion(record, cells.title), os.path.join(cells.out, 'lesion.png'))
    return record


def analyse_landscape(cells: Cells, config: dict) -> dict:
    """{model: {depth: slices around the trained weights}, 'init': {model: {depth: the same around the
    cell's initial weights}}}: a wall that is there at init comes from the architecture, not the minimum."""
    train = head(cells.data.train, config['landscape_samples'])

    def slices(net: nn.Module) -> dict:
        return landscape(net, train, config['landscape_dirs'], config['landscape_points'], config['landscape_grid'],
                         cells.generator)
    record: dict = {m: {str(d): slices(cells.trained[m, d]) for d in cells.landscape_depths} for m in MODELS}
    record['init'] = {m: {str(d): slices(initial_model(cells, m, d)) for d in cells.landscape_depths} for m in MODELS}
    for stage, by_model in (('trained', record), ('init', record['init'])):
        for m in MODELS:
            for d, r in by_model[m].items():
                print(f"landscape {stage:>7} {m:>8} depth {d:>3}: loss {r['loss0']:.4f}, mean rise at step 0.5 "
                      f"{r['rise'].get('0_5', float('nan')):.4g}, at 1 {r['rise']['1']:.4g}")
    save_figure(plot_landscape_1d(record, cells.title), os.path.join(cells.out, 'landscape_1d.png'))
    save_figure(plot_landscape_2d(record, cells.title), os.path.join(cells.out, 'landscape_contour.png'))
    save_figure(plot_landscape_2d(record, cells.title, surface=True), os.path.join(cells.out, 'landscape_surface.png'))
    return record


def analyse_shattering(cells: Cells, config: dict) -> dict:
    test = head(cells.data.test, 2 * config['lines'])
    record: dict = {}
    for stage in ('init', 'trained'):
        record[stage] = {m: {} for m in MODELS}
        for d in cells.depths:
            for m in MODELS:
                model = cells.trained[m, d] if stage == 'trained' else initial_model(cells, m, d)
                record[stage][m][str(d)] = shattering(model, test, config['lines'], config['line_points'],
                                                      config['max_lag'])
    print_shattering(record)
    save_figure(plot_shattering(record, cells.title), os.path.join(cells.out, 'shattering.png'))
    return record


# the init controls: variant -> (cell, change to its initial weights); see controls.py
CONTROLS = {'plain': ('plain', None), 'plain_orthogonal': ('plain', orthogonal_init),
            'residual': ('residual', None), 'residual_unscaled': ('residual', unscale_branches)}


def analyse_controls(cells: Cells, config: dict) -> dict:
    """At init, for the cells' own inits and the controls: {'grads': {variant: {depth: [||dL/dW|| * ||W||
    per layer]}}, 'shattering': {variant: {depth: shattering() without its example}}}, the gradients as
    gradient_study takes them (first training batch, train mode, the cell's label smoothing)."""
    train, test = cells.data.train, head(cells.data.test, 2 * config['lines'])
    x, y = train.normalize(train.x[:cells.study['batch_size']]), train.y[:cells.study['batch_size']]
    record: dict = {'grads': {v: {} for v in CONTROLS}, 'shattering': {v: {} for v in CONTROLS}}
    for d in cells.depths:
        for variant, (m, change) in CONTROLS.items():
            net = initial_model(cells, m, d, change)
            torch.manual_seed(0)  # as gradient_study: the same dropout masks, if any
            norms = grad_norms(net.train(), x, y, cells.configs[m, d]['label_smoothing'])
            record['grads'][variant][str(d)] = [n['scale_free'] for n in norms]
            r = shattering(net, test, config['lines'], config['line_points'], config['max_lag'])
            record['shattering'][variant][str(d)] = {k: v for k, v in r.items() if k != 'example'}
    print_shattering({'init': record['shattering']})
    save_figure(plot_controls(record, cells.title), os.path.join(cells.out, 'controls.png'))
    return record


ANALYSES = {'grads': analyse_grads, 'lesion': analyse_lesion, 'landscape': analyse_landscape,
            'shattering': analyse_shattering, 'controls': analyse_controls}


def main(config: dict, overrides: dict) -> None:
    if config['smoke']:
        config = {**config, **{k: v for k, v in SMOKE.items() if k not in overrides}}
    study, depths = study_settings(config)
    parts = PARTS if config['part'] == 'all' else (config['part'],)
    landscape_depths = config['landscape_depths'] or sorted({depths[len(depths) // 2], depths[-1]})
    if not set(landscape_depths) <= set(depths):
        raise UserError(f"--landscape_depths {landscape_depths} must be among --depths {depths}")
    cells, summary = load_cells(config, study, depths, landscape_depths)
    os.makedirs(cells.out, exist_ok=True)
    path = os.path.join(cells.out, 'results.json')
    results = {}
    if os.path.exists(path):  # the parts of earlier runs on the same cells stay
        with open(path) as f:
            results = json.load(f)
    results.update({'study': config['study'], 'exercise': cells.module.EXERCISE,
                    'cells': {**results.get('cells', {}), **summary},  # every cell any part has analysed
                    'study_config': {k: v for k, v in study.items() if k not in ('runs_dir', 'data_dir')}})
    for part in parts:
        results[part] = ANALYSES[part](cells, config)
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
            if 'recalibrated' in r:
                bn = r['recalibrated']
                print(f"{'':>9} {'':>5} {100 * bn['intact']:7.2f} {100 * bn['k_blocks'].get('1', math.nan):15.2f} "
                      f"{100 * min(bn['one_block'] or [math.nan]):6.2f}   (BatchNorm statistics re-estimated)")
            if r.get('branch_ratio'):
                ratios = r['branch_ratio']
                print(f"{'':>9} {'':>5} ||branch(x)|| / ||x|| per block: min {min(ratios):.3f}, "
                      f"median {sorted(ratios)[len(ratios) // 2]:.3f}, max {max(ratios):.3f}")


def print_shattering(shatter: dict) -> None:
    for stage, by_model in shatter.items():
        for m, by_depth in by_model.items():
            print(f"shattering {stage:>7} {m:>8}: lag-1 autocorrelation by depth "
                  + '  '.join(f"{d}: {r['lag1']:.3f}" for d, r in by_depth.items()))


if __name__ == '__main__':
    cli(main, config, choices={'part': (*PARTS, 'all'), 'study': tuple(STUDIES),
                               'dataset': dataset_names(),
                               'wandb': ('online', 'offline', 'off')})
