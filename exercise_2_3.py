"""Exercise 2.3 — class activation maps: where a CNN looks, and whether it decides there.

The lab asks for CAM (Zhou et al. 2016) on the CNN of exercise 1.3, to show which image
regions drive which class, and then on a pretrained ResNet-18 with Imagenette images at 160 px.
We show CAM, Grad-CAM and Grad-CAM++ side by side (explain.py) and measure how faithful each
map is, against random-map baselines: a map that does not beat random is reported as such.

Part 1 (cnn): the best-on-val checkpoint of exercise 1.3 (--checkpoint, or the newest
  <runs_dir>/exercise_1_3/*/checkpoints/best.pt, preferring --dataset and finished runs; with
  none, exercise 1.3's default is trained first, with this command's smoke overrides). Per class,
  `per_class` correct and wrong test predictions are explained (maps of the predicted class).
Part 2 (resnet): torchvision's ImageNet ResNet-18 on Imagenette val (<data_dir>/imagenette2-160/):
  the real 1000-way head restricted to the ten Imagenette rows, no new head, no training. NOT a
  held-out or zero-shot number: most Imagenette val images are ImageNet training images, and a
  10-way softmax is not comparable with 1000-way top-1 (NOT_HELD_OUT, printed and recorded).
  Target layer layer4; CAM uses those ten rows of fc. If the weights or the images cannot be
  downloaded, part 2 is skipped with a message saying what to fetch and where; part 1 still runs
  and the exit status stays 0. --weights random runs it on random-init weights (smoke tests: the
  maps mean nothing, and figures and results say "random weights").
Maps: the target layer's h x w is printed and recorded; below --min_map_size cells a side the run
  stops with one line (a 1x1 map is one number: it cannot point anywhere); a test accuracy closer to
  chance than to 100% is warned about.
Faithfulness, per method and for baselines (random: i.i.d. per pixel; random smooth: random at the
  target layer's resolution, upsampled like the maps; constant: the image's mean CAM value
  everywhere), on the predicted class: deletion / insertion AUC (RISE; `faithfulness_steps` steps
  of H*W/steps pixels) and Average Drop / Increase in Confidence. One "removed" for all four, the
  substrate: black on black-background sets (mnist, fashion_mnist, digits), else RISE's (mean
  colour; insertion from a blur of sigma 5 px * width / 224); the other is scored as a sensitivity
  table. Every number has a 95% bootstrap interval over images; `beats_<baseline>` means better
  at 95% confidence, paired image by image (explain.compare).

Writes runs/exercise_2_3/<run>/{cnn,resnet18}_{correct,wrong,faithfulness}.png, results.json
(faithfulness tables with intervals and `beats_random` / `beats_random_smooth` / `beats_constant` flags),
TensorBoard and W&B, and, only with `--assets True`, copies the figures to assets/ex23_*.png, the
the docs' figures (part 2 only with ImageNet weights); by default the source tree is left alone.
Measured results (our CNN on Fashion-MNIST, CPU) are in docs/exercise_2_3.md.

    python exercise_2_3.py                                   # newest 1.3 checkpoint + ResNet-18
    python exercise_2_3.py --checkpoint runs/exercise_1_3/<run>/checkpoints/best.pt --part cnn
    python exercise_2_3.py --part resnet --data_dir ./data   # downloads weights and Imagenette
    python exercise_2_3.py --help                            # every key, default and reason
"""
import glob
import json
import os
import textwrap

import torch
from torch import Tensor, nn

from config import COMMON, UserError, cli
from dataset import Split, load_data, load_imagenette, spread
from evaluate import check_model_on_data, load_model, pyplot
from explain import (SUBSTRATES, average_drop_increase, blur_sigma, bootstrap_ci, cam, compare,
                     deletion_insertion_auc, grad_cam, grad_cam_pp, overlay, predict, random_maps, substrate_fns)
from models import CNN
from checkpoint import Checkpoint
from files import write_json
from provenance import data_fingerprint, split_fingerprint
from record import Run

EXERCISE = 'exercise_2_3'
# What part 1's --checkpoint must hold: CAM needs conv feature maps (model.features) and a GAP + Linear head
CNN_CHECKPOINT = "a models.CNN with its GAP + Linear head, trained on its data's classes (exercise 1.3's best.pt)"
HERE = os.path.dirname(os.path.abspath(__file__))

config = {
    **COMMON,
    'part': 'all',                  # cnn | resnet | all
    'dataset': 'cifar10',           # the 1.3 checkpoint to prefer, and what 1.3 trains when there is none
    'checkpoint': '',               # a 1.3 best.pt; '' = newest under <runs_dir>/exercise_1_3/
    'subset': 0,                    # part 1: explain and score at most this many test images (0 = all)
    'batch_size': 64,               # images per map / faithfulness pass: bounds memory, not results
    'per_class': [2, 1],            # test images shown per class: [correct, wrong] predictions
    'faithfulness_images': 500,     # part 1 test images scored, evenly spread over the test split
    'faithfulness_steps': 32,       # deletion/insertion steps of H*W/steps pixels each (curves: steps + 1 points)
    'substrate': 'auto',            # auto (black on mnist, fashion_mnist, digits; else rise) | black | rise
    'sensitivity': True,            # also score every map with the other substrate (a sensitivity table)
    'min_map_size': 3,              # refuse target-layer maps smaller than this many cells a side (1x1 cannot localise)
    'weights': 'imagenet',          # imagenet (torchvision download) | random (smoke runs: meaningless maps)
    'image_size': 160,              # Imagenette: resize the shorter side, centre crop (px)
    'imagenette_limit': 0,          # Imagenette val images evaluated, evenly spread (0 = all 3,925)
    'resnet_faithfulness_images': 200,  # Imagenette val images scored (66 forwards each per map kind at 32 steps)
    'assets': False,                # opt-in: also copy the figures to assets_dir/ex23_*.png (the docs' figures)
    'assets_dir': 'assets',         # relative to this script's folder unless absolute
}

METHODS = ('cam', 'grad_cam', 'grad_cam_pp')
BASELINES = ('random', 'random_smooth', 'constant')
LABELS = {'cam': 'CAM', 'grad_cam': 'Grad-CAM', 'grad_cam_pp': 'Grad-CAM++', 'random': 'random',
          'random_smooth': 'random smooth', 'constant': 'constant'}
BETTER = {'deletion_auc': 'lower', 'insertion_auc': 'higher',  # how each metric rewards a faithful map
          'average_drop': 'lower', 'increase_in_confidence': 'higher'}
DEL_INS, AD_IC = ('deletion_auc', 'insertion_auc'), ('average_drop', 'increase_in_confidence')
MARK = {'better': '+', 'worse': '-', 'tie': '='}
SHORT = {'black': 'removed = black, insertion from black', 'rise': 'removed = mean colour, insertion from a blur'}
BLACK_BACKGROUND = ('mnist', 'fashion_mnist', 'digits')  # objects on black: black is "nothing there"

# Keys handed on to exercise 1.3 when it must train a checkpoint first: data, system, smoke size.
FORWARD_TO_1_3 = ('dataset', 'data_dir', 'subset', 'epochs', 'max_steps', 'device', 'seed', 'amp', 'channels_last', 'compile',
                  'runs_dir', 'wandb', 'wandb_project')

# Imagenette's ten wnids (sorted, = its labels) as ImageNet-1k class indices: tench, English
# springer, cassette player, chain saw, church, French horn, garbage truck, gas pump, golf ball,
# parachute.
IMAGENETTE_TO_IMAGENET = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Why part 2's accuracy and maps are not a held-out (zero-shot) measurement: printed and recorded with them.
NOT_HELD_OUT = ("Imagenette's 9,469 train + 3,925 val images are the ten classes' ~13,000 ImageNet train + 500 val "
                "images re-split, so at least 3,425 of the 3,925 val images are ImageNet training images of this "
                "ResNet-18; and the softmax over the ten restricted logits is a 10-way task, not comparable with "
                "published 1000-way ImageNet top-1")


# ---------------------------------------------------------------------------------------------
# Maps and faithfulness, shared by both parts

def explain_all(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear, batch: int) -> dict[str, Tensor]:
    """{method: maps (B, H, W) in [0, 1]} of the predicted class for normalised images x (B, C, H, W)."""
    fns = {'cam': lambda xb: cam(model, xb, layer, fc), 'grad_cam': lambda xb: grad_cam(model, xb, layer),
           'grad_cam_pp': lambda xb: grad_cam_pp(model, xb, layer)}
    return {m: torch.cat([fns[m](xb) for xb in x.split(batch)]) for m in METHODS}


def predict_all(model: nn.Module, split: Split, batch: int) -> Tensor:
    """Softmax probabilities (N, n) of every image of split, batched."""
    return torch.cat([predict(model, split.normalize(xb))[0] for xb in split.x.split(batch)])


def smooth_random_maps(shape: tuple[int, int, int], size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Random maps with the methods' spatial statistics: uniform noise at the target layer's
    resolution (B, h, w), upsampled bilinearly to (H, W) and min-max scaled, as the maps are."""
    m = torch.nn.functional.interpolate(random_maps(shape, generator)[:, None], size=size, mode='bilinear',
                                        align_corners=False)[:, 0]  # (B, H, W)
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    return (m - lo) / (hi - lo + 1e-7)


def substrate_for(dataset: str, choice: str) -> str:
    """config['substrate'] resolved: 'auto' = black for black-background sets (a black pixel is what
    "nothing there" looks like to these models: the mean grey is not), RISE's for natural images."""
    if choice != 'auto':
        return choice
    return 'black' if dataset in BLACK_BACKGROUND else 'rise'


def faithfulness_table(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear, mean: Tensor, std: Tensor,
                       substrate: str, config: dict) -> tuple[dict, dict, dict]:
    """Deletion / insertion AUC, Average Drop and Increase in Confidence of every method and of the
    baselines on normalised images x, for the predicted class, with `substrate` (explain.SUBSTRATES)
    as what a removed pixel becomes in all four; plus the mean curves and checks of the setup.

    Baselines: 'random' i.i.d. per pixel, 'random_smooth' random at the target layer's resolution
    upsampled like the maps, 'constant' every pixel at the image's CAM mean (no location at all).
    Every number has a 95% bootstrap interval over images, and every comparison of a method (and of
    the constant map) with a baseline is paired image by image ('vs'); `beats_<baseline>` is True
    only when the method is better at 95% confidence. "Random" tests location: on deletion and
    insertion it is the random map's pixel order (ties in any map are broken by that same order);
    on Average Drop and Increase in Confidence, which also reward a map's contrast, it is the same
    map with its pixels shuffled, so only where the values sit differs. A constant map is therefore
    the random baseline on every metric: it ties 'random' by construction.
    Returns (table, {name: {kind: mean curve}}, checks).
    """
    removed, start = substrate_fns(substrate, mean, std)
    gen = torch.Generator().manual_seed(config['seed'])  # the random baselines' maps
    names = (*METHODS, *BASELINES)
    vals: dict = {m: {k: [] for k in BETTER} for m in names}
    shuffled: dict = {m: {k: [] for k in AD_IC} for m in (*METHODS, 'constant')}
    curves = {m: {'deletion': 0.0, 'insertion': 0.0} for m in names}
    hw = tuple(cam(model, x[:1], layer, fc, normalize=False).shape[-2:])  # the target layer's (h, w)
    same, start_agree, start_p = 0.0, [], []
    for xb in x.split(config['batch_size']):
        maps = explain_all(model, xb, layer, fc, config['batch_size'])
        same = max(same, (maps['cam'] - maps['grad_cam']).abs().max().item())
        rnd = random_maps((len(xb), *xb.shape[2:]), generator=gen).to(xb.device)
        maps['random'] = rnd
        maps['random_smooth'] = smooth_random_maps((len(xb), *hw), tuple(xb.shape[2:]), gen).to(xb.device)
        maps['constant'] = maps['cam'].mean((1, 2), keepdim=True).expand_as(maps['cam'])
        perm = rnd.flatten(1).argsort(1)  # (B, H*W): one random shuffle of the pixels per image
        for m in names:
            di = deletion_insertion_auc(model, xb, maps[m], None, steps=config['faithfulness_steps'],
                                        substrate_fn=removed, insertion_fn=start, tie_break=rnd)
            ad = average_drop_increase(model, xb, maps[m], None, substrate_fn=removed, per_image=True)
            per_image = {'deletion_auc': di['deletion_aucs'], 'insertion_auc': di['insertion_aucs'],
                         'average_drop': ad['average_drops'], 'increase_in_confidence': ad['increases']}
            for k, v in per_image.items():
                vals[m][k].append(v.cpu())
            for kind in ('deletion', 'insertion'):
                curves[m][kind] = curves[m][kind] + di[f'{kind}_curve'].cpu() * len(xb)
            if m in shuffled:
                mix = maps[m].flatten(1).gather(1, perm).view_as(maps[m])
                ad = average_drop_increase(model, xb, mix, None, substrate_fn=removed, per_image=True)
                shuffled[m]['average_drop'].append(ad['average_drops'].cpu())
                shuffled[m]['increase_in_confidence'].append(ad['increases'].cpu())
        probs, pred = predict(model, xb)
        start_probs, start_pred = predict(model, start(xb))
        start_agree.append((start_pred == pred).cpu())
        start_p.append(start_probs.gather(1, pred[:, None])[:, 0].cpu())
    vals = {m: {k: torch.cat(v) for k, v in row.items()} for m, row in vals.items()}
    shuffled = {m: {k: torch.cat(v) for k, v in row.items()} for m, row in shuffled.items()}
    table = {m: {**{k: v.mean().item() for k, v in vals[m].items()},
                 'ci95': {k: bootstrap_ci(v, seed=config['seed']) for k, v in vals[m].items()}} for m in names}
    for m in shuffled:
        refs = {'random': {**{k: vals['random'][k] for k in DEL_INS}, **shuffled[m]},
                'random_smooth': vals['random_smooth'], 'constant': vals['constant']}
        if m == 'constant':
            refs = {'random': refs['random']}
        table[m]['vs'] = {b: {k: compare(vals[m][k], ref[k], BETTER[k], config['seed']) for k in BETTER}
                          for b, ref in refs.items()}
        for b, res in table[m]['vs'].items():
            table[m][f'beats_{b}'] = {k: r['verdict'] == 'better' for k, r in res.items()}
        table[m]['shuffled'] = {k: v.mean().item() for k, v in shuffled[m].items()}
    n = len(x)
    classes = fc.out_features
    agree = torch.cat(start_agree).float().mean().item()
    checks = {'cam_vs_grad_cam_max_abs_diff': same,
              'insertion_start': {'agreement_with_prediction': agree,
                                  'mean_p_predicted': torch.cat(start_p).mean().item(),
                                  'chance': 1 / classes, 'near_chance': agree < 2 / classes,
                                  'rule': 'near chance = the start image gets the prediction of the full image for '
                                          'fewer than 2 / classes of the images'}}
    curves = {m: {kind: (c / n).tolist() for kind, c in cs.items()} for m, cs in curves.items()}
    return table, curves, checks


def faithfulness(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear, mean: Tensor, std: Tensor,
                 dataset: str, config: dict) -> dict:
    """The table with the chosen substrate and, with config['sensitivity'], the same with the other."""
    chosen = substrate_for(dataset, config['substrate'])
    table, curves, checks = faithfulness_table(model, x, layer, fc, mean, std, chosen, config)
    out = {'substrate': chosen, 'table': table, 'curves': curves, 'checks': checks}
    if config['sensitivity']:
        other = 'rise' if chosen == 'black' else 'black'
        t, _, c = faithfulness_table(model, x, layer, fc, mean, std, other, config)
        out['sensitivity'] = {'substrate': other, 'table': t, 'checks': c}
    return out


def logged_metrics(prefix: str, table: dict) -> dict[str, float]:
    """Every number of the printed faithfulness table (each metric and its 95% interval) as flat keys."""
    return {**{f'{prefix}/{m}/{k}': v for m, row in table.items() for k, v in row.items() if k in BETTER},
            **{f'{prefix}/{m}/{k}/ci95_{end}': ci[i] for m, row in table.items()
               for k, ci in row.get('ci95', {}).items() for i, end in enumerate(('low', 'high'))}}


def table_rows(table: dict) -> list[dict]:
    """The faithfulness table as rows (one per method) for Run.log_table."""
    return [{'method': m, **{k: v for k, v in row.items() if k in BETTER},
             **{f'{k}/ci95_{end}': ci[i] for k, ci in row.get('ci95', {}).items() for i, end in enumerate(('low', 'high'))},
             **{f'{k}/{metric}': won for k, wins in row.items() if k.startswith('beats_')
                for metric, won in wins.items()}}
            for m, row in table.items()]


def pick_examples(y: Tensor, pred: Tensor, n_correct: int, n_wrong: int, num_classes: int) -> dict[str, list[int]]:
    """The first n_correct correctly and n_wrong wrongly predicted test images of every class."""
    out: dict[str, list[int]] = {'correct': [], 'wrong': []}
    for c in range(num_classes):
        out['correct'] += torch.nonzero((y == c) & (pred == c))[:n_correct, 0].tolist()
        out['wrong'] += torch.nonzero((y == c) & (pred != c))[:n_wrong, 0].tolist()
    return out


def print_table(title: str, table: dict, substrate: str, checks: dict, notes: bool = True) -> None:
    print(f"\nfaithfulness, {title}; substrate '{substrate}': {SHORT[substrate]}")
    print(f"  {'map':<13} {'deletion AUC (lower)':>27} {'insertion AUC (higher)':>27} "
          f"{'Average Drop % (lower)':>27} {'Increase % (higher)':>27}")
    for m, row in table.items():
        cells = [f"{row[k]:.3f} [{row['ci95'][k][0]:.3f},{row['ci95'][k][1]:.3f}]" if 'auc' in k else
                 f"{row[k]:.1f} [{row['ci95'][k][0]:.1f},{row['ci95'][k][1]:.1f}]" for k in BETTER]
        if 'vs' in row:
            cells = [c + ' ' + '/'.join(MARK[row['vs'][b][k]['verdict']] for b in row['vs'])
                     for c, k in zip(cells, BETTER)]
        print(f"  {LABELS[m]:<13} {cells[0]:>27} {cells[1]:>27} {cells[2]:>27} {cells[3]:>27}")
    start = checks['insertion_start']
    if not start['near_chance']:
        print(f"  WARNING: {100 * start['agreement_with_prediction']:.0f}% of insertion's start images keep their "
              f"prediction (chance {100 * start['chance']:.0f}%): insertion AUC measures little here")
    if not notes:
        return
    print("  [95% bootstrap interval over images]; vs random / random smooth / constant, paired, at 95%: "
          "+ better, - worse, = tie")
    print("  'random' tests location: the random pixel order (deletion, insertion), the map's own pixels shuffled "
          "(Average Drop, Increase)")
    print(f"  CAM and Grad-CAM are one result, not two: with GAP + one linear layer Grad-CAM = ReLU(CAM) / (h*w), "
          f"the same after min-max (max |diff| {checks['cam_vs_grad_cam_max_abs_diff']:.1e})")


# ---------------------------------------------------------------------------------------------
# Figures

def plot_maps(images: Tensor, maps: dict[str, Tensor], probs: Tensor, y: Tensor, classes: list[str], title: str,
              per_row: int = 2):
    """`per_row` images per row (the examples of one class side by side), each as a group: the image
    (true and predicted class, p of the prediction), then each method's map over it. images uint8
    (B, C, H, W), maps {method: (B, H, W)}, probs (B, n), all on the CPU."""
    plt = pyplot()
    b, group = len(images), 1 + len(maps)
    rows, cols = -(-b // per_row), per_row * group
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows + 0.5), squeeze=False,
                             layout='constrained')  # constrained: the title never overlaps the headers
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(b):
        row, first = i // per_row, (i % per_row) * group
        img = images[i]
        ax = axes[row, first]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap='gray', vmin=0, vmax=255)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())  # (C, H, W) -> (H, W, C)
        pred = int(probs[i].argmax())
        right = pred == int(y[i])
        ax.set_title(f"{classes[y[i]]}" + ('' if right else f"\n→ {classes[pred]}") + f" {probs[i, pred]:.2f}",
                     fontsize=7, color='green' if right else 'red')
        rgb = img.expand(3, -1, -1)  # overlay wants 3 channels; grey images are repeated
        for j, (name, m) in enumerate(maps.items()):
            ax = axes[row, first + 1 + j]
            ax.imshow(overlay(rgb, m[i]))
            if row == 0:
                ax.set_title(LABELS[name], fontsize=8)
    fig.suptitle(f"{title}\n(title: true class, → predicted if wrong, p of the prediction; "
                 f"green right, red wrong; maps of the predicted class)", fontsize=9)
    return fig


def plot_faithfulness(curves: dict, table: dict, title: str, substrate: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ('deletion', 'insertion')):
        for m, cs in curves.items():
            x = torch.linspace(0, 1, len(cs[kind])).tolist()
            ax.plot(x, cs[kind], label=f"{LABELS[m]} (AUC {table[m][f'{kind}_auc']:.3f})",
                    linestyle={'random': '--', 'random_smooth': ':', 'constant': '-.'}.get(m, '-'),
                    color='gray' if m in BASELINES else None)
        what = {('black', 'deletion'): 'deleted (set to black)', ('black', 'insertion'): 'inserted into a black image',
                ('rise', 'deletion'): 'deleted (set to the mean colour)',
                ('rise', 'insertion'): 'inserted into the blurred image'}[substrate, kind]
        ax.set_xlabel(f'fraction of pixels {what}', fontsize=8)
        ax.set_ylabel('p(predicted class)')
        better = 'lower' if kind == 'deletion' else 'higher'
        ax.set_title(f"{kind}, most salient pixels first ({better} AUC = more faithful)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figures(run: Run, figures: dict, config: dict, to_assets: bool) -> list[str]:
    """Run.log_figures; with to_assets also copied to assets_dir/ex23_<name>.png (the docs' figures)."""
    return run.log_figures(figures, os.path.join(HERE, config['assets_dir']) if to_assets else None, 'ex23_')


def explain_examples(run: Run, model: nn.Module, split: Split, probs: Tensor, classes: list[str], layer: nn.Module,
                     fc: nn.Linear, prefix: str, title: str, config: dict, to_assets: bool) -> list[str]:
    """The correct / wrong example grids of one model."""
    picks = pick_examples(split.y, probs.argmax(1), *config['per_class'], len(classes))
    figures = {}
    for kind, idx in picks.items():
        if not idx:
            print(f"{prefix}: no {kind} predictions to show")
            continue
        idx = torch.tensor(idx, device=split.x.device)
        maps = explain_all(model, split.normalize(split.x[idx]), layer, fc, config['batch_size'])
        figures[f'{prefix}_{kind}'] = plot_maps(split.x[idx].cpu(), {m: v.cpu() for m, v in maps.items()},
                                                probs[idx].cpu(), split.y[idx].cpu(), classes,
                                                f"{title}: {kind} predictions, maps of the predicted class")
    return save_figures(run, figures, config, to_assets)


def setup(images: int, steps: int, size: tuple[int, int], map_size: tuple[int, int], faith: dict,
          config: dict) -> dict:
    """How the faithfulness numbers were measured, stored next to them."""
    h, w = size
    return {'images': images, 'explained_class': 'predicted', 'steps': steps, 'pixels_per_step': h * w / steps,
            'map_size': list(map_size), 'input_size': [h, w],
            'substrate': faith['substrate'], 'substrate_means': SUBSTRATES[faith['substrate']],
            'sensitivity_substrate': faith.get('sensitivity', {}).get('substrate'),
            'blur_sigma_px': blur_sigma(w), 'blur_rule': 'sigma = 5 px * width / 224 (RISE: 5 px at 224 px)',
            'average_drop_masking': 'substrate + map * (image - substrate): a fully masked pixel is removed as in '
                                    'deletion',
            'random_baseline': f"i.i.d. uniform per-pixel maps (explain.random_maps), seed {config['seed']}; "
                               "its pixel order also breaks ties in every map's order",
            'random_smooth_baseline': 'uniform noise at the target layer resolution, bilinearly upsampled and '
                                      'min-max scaled like the maps, same generator',
            'constant_baseline': "every pixel at the image's mean CAM value: no location, CAM's contrast",
            'beats_random': 'better at 95% confidence (paired bootstrap over images, 2000 resamples) than random '
                            'location: the random pixel order on deletion / insertion, the same map with its pixels '
                            'shuffled on Average Drop / Increase in Confidence; ties are ties',
            'intervals': '95% percentile bootstrap over images, 2000 resamples',
            'cam_equals_grad_cam': 'on a GAP + linear head Grad-CAM = ReLU(CAM) / (h*w): the same map after min-max, '
                                   'one result shown twice', **faith['checks'],
            'metric_directions': BETTER}


def check_maps(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear, acc: float, classes: int,
               config: dict) -> tuple[tuple[int, int], list[str]]:
    """The target layer's map size (h, w) on images like x (refused, one line, when too small to
    localise anything), and the warnings to print and record (accuracy near chance)."""
    hw = tuple(cam(model, x[:1], layer, fc, normalize=False).shape[-2:])
    print(f"maps explained: {hw[0]}x{hw[1]} cells at the target layer for {x.shape[2]}x{x.shape[3]} px inputs, "
          f"upsampled to the image")
    warnings = []
    chance = 1 / classes
    if acc < chance + (1 - chance) / 2:  # closer to chance than to perfect
        warnings.append(f"WARNING: test accuracy {100 * acc:.1f}% is near chance ({100 * chance:.0f}%): the maps "
                        f"explain a model that has learned little, and say little about the task")
        print(warnings[-1])
    if min(hw) < config['min_map_size']:
        raise UserError(f"the target layer's maps are {hw[0]}x{hw[1]} for {x.shape[2]}x{x.shape[3]} px inputs, below "
                        f"--min_map_size {config['min_map_size']}: too coarse to say where the model looks (use a "
                        f"checkpoint with fewer poolings or larger inputs)")
    return hw, warnings


# ---------------------------------------------------------------------------------------------
# Part 1: our CNN from exercise 1.3

def run_dataset(run_dir: str) -> str | None:
    try:
        with open(os.path.join(run_dir, 'config.json')) as f:
            return json.load(f).get('dataset')
    except (OSError, ValueError):
        return None


def find_checkpoint(config: dict, overrides: dict) -> str:
    """The newest exercise 1.3 best.pt, preferring config['dataset'], then finished runs; trains
    exercise 1.3's default (with this command's data / system / smoke overrides) if there is none."""
    pattern = os.path.join(config['runs_dir'], 'exercise_1_3', '*', 'checkpoints', 'best.pt')
    found = glob.glob(pattern)
    if not found:
        print(f"no exercise 1.3 checkpoint matches {pattern}: training exercise 1.3's default on "
              f"{config['dataset']} first (or pass --checkpoint PATH)")
        import exercise_1_3
        forwarded = {k: config[k] for k in FORWARD_TO_1_3 if k in overrides or k == 'dataset'}
        exercise_1_3.main({**exercise_1_3.config, **forwarded}, forwarded)
        found = glob.glob(pattern)
        if not found:
            raise UserError(f"exercise 1.3 wrote no checkpoint matching {pattern}")

    def preference(path: str) -> tuple:
        run_dir = os.path.dirname(os.path.dirname(path))
        return (run_dataset(run_dir) == config['dataset'], os.path.exists(os.path.join(run_dir, 'results.json')),
                os.path.getmtime(path))
    best = max(found, key=preference)
    wanted, finished, _ = preference(best)
    print(f"checkpoint {best}" + ('' if wanted else f" (none on {config['dataset']}; newest of any dataset)")
          + ('' if finished else ' (its run has no results.json yet: still training or stopped)'))
    return best


def explain_cnn(run: Run, model: nn.Module, ckpt: Checkpoint, config: dict, overrides: dict) -> dict:
    device = run.device
    model.to(device).eval()
    data_config = {**ckpt.config, 'subset': config['subset']}  # the run's data, its normalisation
    if 'data_dir' in overrides:  # the checkpoint came from another machine
        data_config['data_dir'] = config['data_dir']
    data = load_data(data_config, device)
    check_model_on_data(model, data, config['checkpoint'], CNN_CHECKPOINT)
    test, layer, fc = data.test, model.features, model.classifier
    probs = predict_all(model, test, config['batch_size'])  # (N, n)
    acc = (probs.argmax(1) == test.y).float().mean().item()
    name = f"{type(model).__name__} {model.args.get('variant', '')} {data.name}"
    print(f"part 1: {name} from {config['checkpoint']}, test acc {100 * acc:.2f}% on {len(test)} images")

    hw, warnings = check_maps(model, test.normalize(test.x[:1]), layer, fc, acc, len(data.classes), config)

    paths = explain_examples(run, model, test, probs, data.classes, layer, fc, 'cnn', name, config, config['assets'])
    idx = spread(len(test), config['faithfulness_images'])
    faith = faithfulness(model, test.normalize(test.x[idx]), layer, fc, test.mean, test.std, data.name, config)
    table, curves = faith['table'], faith['curves']
    info = setup(len(idx), config['faithfulness_steps'], tuple(test.x.shape[2:]), hw, faith, config)
    title = f"{name}, {len(idx)} test images, {config['faithfulness_steps']} steps"
    print_table(title, table, faith['substrate'], faith['checks'])
    if 'sensitivity' in faith:
        print_table(f"{title}: SENSITIVITY", faith['sensitivity']['table'], faith['sensitivity']['substrate'],
                    faith['sensitivity']['checks'], notes=False)
    paths += save_figures(run, {'cnn_faithfulness': plot_faithfulness(curves, table, title, faith['substrate'])},
                          config, config['assets'])
    run.log({'cnn/test_acc': acc, **logged_metrics('cnn', table),
             **logged_metrics('cnn_sensitivity', faith.get('sensitivity', {}).get('table', {}))}, step=0)
    run.log_table('cnn_faithfulness_table', table_rows(table))
    return {'cnn': table, 'cnn_sensitivity': faith.get('sensitivity'),
            'cnn_setup': {'checkpoint': config['checkpoint'], 'dataset': data.name,
                          'data_dir': data_config['data_dir'], 'test_acc': acc,
                          'test_images': len(test), **info, 'data': data_fingerprint(data)},
            'cnn_curves': curves, 'warnings': warnings, 'figures': paths}


# ---------------------------------------------------------------------------------------------
# Part 2: ImageNet ResNet-18 on Imagenette (not held out: see NOT_HELD_OUT)

def build_resnet18(weights: str) -> nn.Module:
    """torchvision's ResNet-18: ImageNet weights (downloaded once to $TORCH_HOME) or random init."""
    from torchvision.models import ResNet18_Weights, resnet18
    if weights == 'random':
        return resnet18(weights=None)
    w = ResNet18_Weights.IMAGENET1K_V1
    try:
        return resnet18(weights=w)
    except Exception as e:  # noqa: BLE001 - offline, proxy, hash mismatch: one clear line
        folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UserError(f"could not download the ResNet-18 ImageNet weights {w.url} into {folder} "
                        f"({type(e).__name__}); put {os.path.basename(w.url)} there by hand") from None


def restrict_head(model: nn.Module, rows: list[int]) -> nn.Module:
    """Replace model.fc by the same Linear keeping only `rows`: new model(x) == old model(x)[:, rows]."""
    fc = model.fc
    head = nn.Linear(fc.in_features, len(rows)).to(fc.weight)
    with torch.no_grad():
        head.weight.copy_(fc.weight[rows])
        head.bias.copy_(fc.bias[rows])
    model.fc = head
    return model


def explain_resnet(run: Run, config: dict) -> dict:
    if config['weights'] not in ('imagenet', 'random'):
        raise UserError(f"unknown weights {config['weights']!r}; choose imagenet or random")
    problems, model = [], None
    try:
        model = build_resnet18(config['weights'])
    except UserError as e:
        problems.append(str(e))
    try:
        x, y, classes = load_imagenette(config['data_dir'], 'val', '160px', config['image_size'],
                                        config['imagenette_limit'])
    except UserError as e:
        problems.append(str(e))
    if problems:
        message = 'part 2 (ResNet-18 on Imagenette) skipped: ' + ' | '.join(problems)
        print(message)
        return {'resnet18': None, 'resnet18_imagenette_val_acc': None, 'resnet18_skipped': message}

    device, random = run.device, config['weights'] == 'random'
    label = 'ResNet-18, random weights (meaningless maps)' if random else 'ResNet-18, ImageNet weights'
    model = restrict_head(model, IMAGENETTE_TO_IMAGENET).to(device).eval()
    c = len(IMAGENET_MEAN)
    val = Split(x=x.to(device), y=y.to(device), mean=torch.tensor(IMAGENET_MEAN, device=device).view(1, c, 1, 1),
                std=torch.tensor(IMAGENET_STD, device=device).view(1, c, 1, 1))
    probs = predict_all(model, val, config['batch_size'])  # (N, 10): softmax over the ten restricted logits
    right = (probs.argmax(1) == val.y).float()
    acc = right.mean().item()
    per_class = [right[val.y == k].mean().item() if (val.y == k).any() else None for k in range(len(classes))]
    print(f"part 2: {label}, top-1 on Imagenette val ({len(val)} images, {config['image_size']} px, "
          f"ImageNet head rows {IMAGENETTE_TO_IMAGENET}): {100 * acc:.2f}%")
    print(textwrap.fill(f"NOT zero-shot, NOT held out: {NOT_HELD_OUT}", 100, initial_indent='  ',
                        subsequent_indent='  '))

    layer, fc = model.layer4, model.fc
    hw, warnings = check_maps(model, val.normalize(val.x[:1]), layer, fc, acc, len(classes), config)
    to_assets = config['assets'] and not random  # random-weight maps never become docs figures
    paths = explain_examples(run, model, val, probs, classes, layer, fc, 'resnet18', f'{label}, Imagenette val',
                             config, to_assets)
    idx = spread(len(val), config['resnet_faithfulness_images']).to(device)
    faith = faithfulness(model, val.normalize(val.x[idx]), layer, fc, val.mean, val.std, 'imagenette', config)
    table, curves = faith['table'], faith['curves']
    info = setup(len(idx), config['faithfulness_steps'], (config['image_size'],) * 2, hw, faith, config)
    title = f"{label}, {len(idx)} Imagenette val images, {config['faithfulness_steps']} steps"
    print_table(title, table, faith['substrate'], faith['checks'])
    if 'sensitivity' in faith:
        print_table(f"{title}: SENSITIVITY", faith['sensitivity']['table'], faith['sensitivity']['substrate'],
                    faith['sensitivity']['checks'], notes=False)
    paths += save_figures(run, {'resnet18_faithfulness': plot_faithfulness(curves, table, title, faith['substrate'])},
                          config, to_assets)
    run.log({'resnet18/imagenette_val_acc': acc, **logged_metrics('resnet18', table),
             **logged_metrics('resnet18_sensitivity', faith.get('sensitivity', {}).get('table', {}))}, step=0)
    run.log_table('resnet18_faithfulness_table', table_rows(table))
    return {'resnet18': table, 'resnet18_sensitivity': faith.get('sensitivity'), 'resnet18_weights': config['weights'],
            'resnet18_imagenette_val_acc': acc, 'resnet18_held_out': False, 'resnet18_not_held_out': NOT_HELD_OUT,
            'resnet18_warnings': warnings,
            'resnet18_per_class_acc': dict(zip(classes, per_class)),
            'resnet18_setup': {'weights': 'random weights' if random else 'ImageNet (IMAGENET1K_V1)',
                               'head': f'ImageNet fc rows {IMAGENETTE_TO_IMAGENET}, softmax over these ten',
                               'val_images': len(val), 'image_size': config['image_size'], **info,
                               'data': {'dataset': 'imagenette', 'val': split_fingerprint(val)}},
            'resnet18_curves': curves, 'figures': paths}


# ---------------------------------------------------------------------------------------------

def main(config: dict, overrides: dict) -> dict:
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError("exercise 2.3 runs as one process: start it with python, not torchrun (train the 1.3 "
                        "checkpoint it explains with torchrun exercise_1_3.py, then pass --checkpoint)")
    if config['part'] not in ('cnn', 'resnet', 'all'):
        raise UserError(f"unknown part {config['part']!r}; choose cnn, resnet or all")
    if config['resume']:
        raise UserError("exercise 2.3 trains nothing, so --resume does not apply")
    if len(config['per_class']) != 2 or min(config['per_class']) < 0:
        raise UserError(f"--per_class takes [correct, wrong] counts, got {config['per_class']}")
    cnn = config['part'] in ('cnn', 'all')
    resnet = config['part'] in ('resnet', 'all')

    if cnn:  # before the Run, so the run is named after the checkpoint's dataset
        path = config['checkpoint'] or find_checkpoint(config, overrides)
        model, ckpt = load_model(path, expect=(CNN,), what=CNN_CHECKPOINT)
        if 'dataset' in overrides and overrides['dataset'] != ckpt.config['dataset']:
            print(f"--dataset {overrides['dataset']} ignored: {path} was trained on {ckpt.config['dataset']}")
        config = {**config, 'checkpoint': path, 'dataset': ckpt.config['dataset']}
    else:
        config = {**config, 'dataset': 'imagenette'}
    run = Run(EXERCISE, config, overrides, name='cam')

    results: dict = {'part': config['part']}
    if cnn:
        results.update(explain_cnn(run, model, ckpt, config, overrides))
    if resnet:
        out = explain_resnet(run, config)
        results['figures'] = results.get('figures', []) + out.pop('figures', [])
        results.update(out)

    done = ['part 1 (our CNN) done'] if cnn else []
    if resnet:
        done.append('part 2 skipped (see resnet18_skipped)' if results['resnet18'] is None else
                    f"part 2 done ({'random weights' if config['weights'] == 'random' else 'ImageNet weights'}, "
                    f"Imagenette val acc {100 * results['resnet18_imagenette_val_acc']:.2f}%, not held out)")
    results['summary'] = '; '.join(done)
    run.start()
    results['provenance'] = run.provenance({k: results[k]['data'] for k in ('cnn_setup', 'resnet18_setup')
                                            if isinstance(results.get(k), dict)})
    write_json(run.path('results.json'), results)
    print(f"\n{results['summary']} -> {run.path('results.json')}")
    run.finish(results)
    return results


if __name__ == '__main__':
    cli(main, config, choices={'part': ('cnn', 'resnet', 'all'), 'weights': ('imagenet', 'random'),
                               'substrate': ('auto', 'black', 'rise'),
                               'dataset': ('cifar10', 'fashion_mnist', 'mnist', 'digits')})
