"""Exercise 2.3 — class activation maps: where a CNN looks, and whether it decides there.

Explains exercise 1.3's CNN (part 1) and torchvision's ImageNet ResNet-18 on Imagenette val
(part 2: not held out, see NOT_HELD_OUT) with CAM, Grad-CAM and Grad-CAM++, shows example maps,
and scores how faithful each map is against random, constant and object-prior baselines, with 95%
intervals (explain.faithfulness), paired Holm-corrected comparisons between maps and, for part 1,
Adebayo et al.'s cascading and (--random_labels_epochs) data randomisation (sanity.py). Writes figures
and results.json to runs/exercise_2_3/<run>/. What each choice means, and the results: docs/exercise_2_3.md.

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

from checkpoint import Checkpoint
from config import COMMON, DATA, RUNS, SCHEDULE, UserError, cli, keys_with
from dataset import DATASETS, Split, dataset_names, load_data, load_imagenette, spread
from evaluate import check_model_on_data, load_model
from explain import describe, faithfulness, map_size, predict_all
from explain_display import (example_figures, plot_cascade, plot_faithfulness, plot_rank_correlation, print_cascade,
                             print_comparisons, print_data_randomisation, print_table, table_rows)
from exercise_1_3 import build_model
from files import write_json
from models import CNN, IMAGENET_MEAN, IMAGENET_STD, IMAGENETTE_TO_IMAGENET, build_resnet18, restrict_head
from provenance import data_fingerprint, split_fingerprint
from record import Run
from sanity import data_randomisation, method_comparisons, permuted_label_model, sanity_checks, significant

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
    'sanity_images': 200,           # part 1: test images (spread) for Adebayo's cascading randomisation (0 = skip)
    'random_labels_epochs': 0,      # part 1: Adebayo's data randomisation: epochs of a copy trained on permuted labels (0 = skip)
    'random_labels_subset': 5000,   # its training images (val, test: as many at most): few, so memorising is affordable
    'random_labels_seed': 1,        # seed of its training labels' permutation (its init and shuffling: --seed)
    'min_map_size': 3,              # refuse target-layer maps smaller than this many cells a side (1x1 cannot localise)
    'weights': 'imagenet',          # imagenet (torchvision download) | random (smoke runs: meaningless maps)
    'image_size': 160,              # Imagenette: resize the shorter side, centre crop (px)
    'imagenette_limit': 0,          # Imagenette val images evaluated, evenly spread (0 = all 3,925)
    'resnet_faithfulness_images': 200,  # Imagenette val images scored (66 forwards each per map kind at 32 steps)
    'assets': False,                # opt-in: also copy the figures to assets_dir/ex23_*.png (the docs' figures)
    'assets_dir': 'assets',         # relative to this script's folder unless absolute
}


# Keys handed on to exercise 1.3 when it must train a checkpoint first: data, schedule, where and how it runs.
FORWARD_TO_1_3 = keys_with(COMMON, DATA, SCHEDULE, RUNS)

# Why part 2's accuracy and maps are not a held-out (zero-shot) measurement: printed and recorded with them.
NOT_HELD_OUT = ("Imagenette's 9,469 train + 3,925 val images are the ten classes' ~13,000 ImageNet train + 500 val "
                "images re-split, so at least 3,425 of the 3,925 val images are ImageNet training images of this "
                "ResNet-18; and the softmax over the ten restricted logits is a 10-way task, not comparable with "
                "published 1000-way ImageNet top-1")


# ---------------------------------------------------------------------------------------------
# Shared by both parts: check the maps, show examples, score, print, log

def substrate_for(dataset: str, choice: str) -> str:
    """config['substrate'] resolved: 'auto' = black for black-background sets (a black pixel is what
    "nothing there" looks like to these models: the mean grey is not), RISE's for natural images."""
    if choice != 'auto':
        return choice
    info = DATASETS.get(dataset)  # imagenette (part 2) is natural images, outside the registry
    return 'black' if info is not None and info.background == 'black' else 'rise'


def check_maps(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear, acc: float, classes: int,
               config: dict) -> tuple[tuple[int, int], list[str]]:
    """The target layer's map size (h, w) on images like x (refused, one line, when too small to
    localise anything), and the warnings to print and record (accuracy near chance)."""
    hw = map_size(model, x, layer, fc)
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


def score(model: nn.Module, split: Split, layer: nn.Module, fc: nn.Linear, dataset: str, images: int,
          config: dict) -> dict:
    """explain.faithfulness on `images` images of split spread evenly over it, with the dataset's
    substrate and, with config['sensitivity'], the other one too (a sensitivity table)."""
    idx = spread(len(split), images).to(split.x.device)
    x = split.normalize(split.x[idx])
    kw = dict(steps=config['faithfulness_steps'], batch_size=config['batch_size'], seed=config['seed'])
    chosen = substrate_for(dataset, config['substrate'])
    out = {'substrate': chosen, 'images': len(idx),
           **faithfulness(model, x, layer, fc, split.mean, split.std, chosen, **kw)}
    out['comparisons'] = method_comparisons(out.pop('per_image'), config['seed'])  # paired, Holm over the table
    out['table'] = significant(out['table'])  # 4 digits: the record must fit 64 KB (tests/test_records.py)
    if config['sensitivity']:
        other = 'rise' if chosen == 'black' else 'black'
        other_table = faithfulness(model, x, layer, fc, split.mean, split.std, other, **kw)
        out['sensitivity'] = {'substrate': other, 'table': significant(other_table['table']),
                              'checks': other_table['checks'],
                              'comparisons': method_comparisons(other_table['per_image'], config['seed'])}
    return out


def explain_model(run: Run, model: nn.Module, layer: nn.Module, fc: nn.Linear, split: Split, probs: Tensor, acc: float,
                  classes: list[str], prefix: str, label: str, config: dict, *, dataset: str, images: int, what: str,
                  examples: str, to_assets: bool) -> dict:
    """Part 1's or part 2's tail: map size, example figures (titled `examples`), the faithfulness of
    `images` of split (`what` they are, for titles) and its paired comparisons printed, drawn and logged
    as tables. Returns {prefix, prefix_sensitivity, prefix_comparisons, 'setup', prefix_curves, 'warnings',
    'figures'}."""
    hw, warnings = check_maps(model, split.normalize(split.x[:1]), layer, fc, acc, len(classes), config)
    copy_to = os.path.join(HERE, config['assets_dir']) if to_assets else None
    paths = run.log_figures(example_figures(model, split, probs, classes, layer, fc, prefix, examples,
                                            config['per_class'], config['batch_size']), copy_to, 'ex23_')
    faith = score(model, split, layer, fc, dataset, images, config)
    table, sensitivity = faith['table'], faith.get('sensitivity')
    title = f"{label}, {faith['images']} {what}, {config['faithfulness_steps']} steps"
    tables = [(title, faith, prefix)]
    if sensitivity:
        tables.append((f"{title}: SENSITIVITY", sensitivity, f'{prefix}_sensitivity'))
    for heading, t, name in tables:
        print_table(heading, t['table'], t['substrate'], t['checks'], notes=t is faith)
        print_comparisons(heading, t['comparisons'])
        run.log_table(f'{name}_faithfulness_table', table_rows(t['table']))  # one-off results: tables, not curves
    curves = plot_faithfulness(faith['curves'], table, title, faith['substrate'])
    paths += run.log_figures({f'{prefix}_faithfulness': curves}, copy_to, 'ex23_')
    setup = describe(faith['images'], config['faithfulness_steps'], tuple(split.x.shape[2:]), hw, faith['substrate'],
                     sensitivity and sensitivity['substrate'], faith['checks'], config['seed'])
    return {prefix: table, f'{prefix}_sensitivity': sensitivity, f'{prefix}_comparisons': faith['comparisons'],
            'setup': setup, f'{prefix}_curves': faith['curves'], 'warnings': warnings, 'figures': paths}


# ---------------------------------------------------------------------------------------------
# Part 1: our CNN from exercise 1.3

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
            raise UserError(f"exercise 1.3 wrote no checkpoint matching {pattern}; pass --checkpoint PATH")

    def preference(path: str) -> tuple:
        run_dir = os.path.dirname(os.path.dirname(path))
        try:
            with open(os.path.join(run_dir, 'config.json')) as f:
                dataset = json.load(f).get('dataset')
        except (OSError, ValueError):
            dataset = None
        return dataset == config['dataset'], os.path.exists(os.path.join(run_dir, 'results.json')), os.path.getmtime(path)
    best = max(found, key=preference)
    wanted, finished, _ = preference(best)
    print(f"checkpoint {best}" + ('' if wanted else f" (none on {config['dataset']}; newest of any dataset)")
          + ('' if finished else ' (its run has no results.json yet: still training or stopped)'))
    return best


def explain_cnn(run: Run, model: nn.Module, ckpt: Checkpoint, config: dict, overrides: dict) -> dict:
    model.to(run.device).eval()
    data_config = {**ckpt.config, 'subset': config['subset']}  # the run's data, its normalisation
    if 'data_dir' in overrides:  # the checkpoint came from another machine
        data_config['data_dir'] = config['data_dir']
    data = load_data(data_config, run.device)
    check_model_on_data(model, data, config['checkpoint'], CNN_CHECKPOINT)
    test = data.test
    probs = predict_all(model, test.x, test.normalize, config['batch_size'])  # (N, n)
    acc = (probs.argmax(1) == test.y).float().mean().item()
    name = f"{type(model).__name__} {model.args.get('variant', '')} {data.name}"
    print(f"part 1: {name} from {config['checkpoint']}, test acc {100 * acc:.2f}% on {len(test)} images")
    out = explain_model(run, model, model.features, model.classifier, test, probs, acc, data.classes, 'cnn', name,
                        config, dataset=data.name, images=config['faithfulness_images'], what='test images',
                        examples=name, to_assets=config['assets'])
    setup = {'checkpoint': config['checkpoint'], 'dataset': data.name, 'data_dir': data_config['data_dir'],
             'test_acc': acc, 'test_images': len(test), **out.pop('setup'), 'data': data_fingerprint(data)}
    sanity, paths = run_sanity(run, model, ckpt, test, data.name, config, overrides)
    return {'cnn': out['cnn'], 'cnn_sensitivity': out['cnn_sensitivity'], 'cnn_comparisons': out['cnn_comparisons'],
            'cnn_sanity': sanity, 'cnn_setup': setup, 'cnn_curves': out['cnn_curves'], 'warnings': out['warnings'],
            'figures': out['figures'] + paths}


def run_sanity(run: Run, model: nn.Module, ckpt: Checkpoint, split: Split, dataset: str, config: dict,
               overrides: dict) -> tuple[dict | None, list[str]]:
    """Adebayo's cascading randomisation (sanity.sanity_checks) and, with config['random_labels_epochs'],
    data randomisation (sanity.data_randomisation) on config['sanity_images'] images spread over split:
    printed, drawn (maps per step, rho per step), logged. (None, []) when that is 0."""
    if config['sanity_images'] <= 0:
        return None, []
    idx = spread(len(split), config['sanity_images']).to(split.x.device)
    x, substrate = split.normalize(split.x[idx]), substrate_for(dataset, config['substrate'])
    kw = dict(steps=config['faithfulness_steps'], batch_size=config['batch_size'], seed=config['seed'])
    record, maps = sanity_checks(model, x, split.mean, split.std, substrate, **kw)
    print_cascade(record)
    print_comparisons('sanity checks', record['faithfulness']['comparisons'])
    record['data_randomisation'] = None  # --random_labels_epochs 0: skipped
    if config['random_labels_epochs'] > 0:  # trains (or reuses) a model through training.cached_run
        permuted, about = permuted_label_model(EXERCISE, ckpt.config, config, 'data_dir' in overrides, build_model, run.device)
        data_random, maps['permuted labels'] = data_randomisation(model, permuted, x, split.mean, split.std, substrate, **kw)
        record['data_randomisation'] = data_random = {**data_random, 'model': significant(about)}
        print_data_randomisation(data_random)
        run.log_table('cnn_sanity_data_randomisation', [{'method': m, **r} for m, r in data_random['rank_correlation'].items()])
    title = f"{type(model).__name__} {dataset}, {record['images']} test images"
    copy_to = os.path.join(HERE, config['assets_dir']) if config['assets'] else None
    paths = run.log_figures({'cnn_sanity_maps': plot_cascade(split.x[idx[:3]].cpu(), maps, title),
                             'cnn_sanity_rank_correlation': plot_rank_correlation(record, title)}, copy_to, 'ex23_')
    run.log_table('cnn_sanity_cascade', [{'step': step, 'method': m, **r} for step, row in record['cascade'].items()
                                         for m, r in row.items()])
    return record, paths


# ---------------------------------------------------------------------------------------------
# Part 2: ImageNet ResNet-18 on Imagenette (not held out: see NOT_HELD_OUT)

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
    probs = predict_all(model, val.x, val.normalize, config['batch_size'])  # (N, 10): softmax over the ten rows
    right = (probs.argmax(1) == val.y).float()
    acc = right.mean().item()
    per_class = [right[val.y == k].mean().item() if (val.y == k).any() else None for k in range(len(classes))]
    print(f"part 2: {label}, top-1 on Imagenette val ({len(val)} images, {config['image_size']} px, "
          f"ImageNet head rows {IMAGENETTE_TO_IMAGENET}): {100 * acc:.2f}%")
    print(textwrap.fill(f"NOT zero-shot, NOT held out: {NOT_HELD_OUT}", 100, initial_indent='  ',
                        subsequent_indent='  '))
    out = explain_model(run, model, model.layer4, model.fc, val, probs, acc, classes, 'resnet18', label, config,
                        dataset='imagenette', images=config['resnet_faithfulness_images'], what='Imagenette val images',
                        examples=f'{label}, Imagenette val',
                        to_assets=config['assets'] and not random)  # random-weight maps never become docs figures
    setup = {'weights': 'random weights' if random else 'ImageNet (IMAGENET1K_V1)',
             'head': f'ImageNet fc rows {IMAGENETTE_TO_IMAGENET}, softmax over these ten',
             'val_images': len(val), 'image_size': config['image_size'], **out.pop('setup'),
             'data': {'dataset': 'imagenette', 'val': split_fingerprint(val)}}
    return {'resnet18': out['resnet18'], 'resnet18_sensitivity': out['resnet18_sensitivity'],
            'resnet18_comparisons': out['resnet18_comparisons'],
            'resnet18_weights': config['weights'], 'resnet18_imagenette_val_acc': acc, 'resnet18_held_out': False,
            'resnet18_not_held_out': NOT_HELD_OUT, 'resnet18_warnings': out['warnings'],
            'resnet18_per_class_acc': dict(zip(classes, per_class)), 'resnet18_setup': setup,
            'resnet18_curves': out['resnet18_curves'], 'figures': out['figures']}


# ---------------------------------------------------------------------------------------------

def main(config: dict, overrides: dict) -> dict:
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError("exercise 2.3 runs as one process: start it with python, not torchrun (torchrun "
                        "exercise_1_3.py trains the checkpoint it explains)")
    if config['part'] not in ('cnn', 'resnet', 'all'):
        raise UserError(f"unknown part {config['part']!r}; choose cnn, resnet or all")
    if config['resume']:
        raise UserError("--resume does not apply to exercise 2.3 (its one training run, the permuted-label copy, "
                        "resumes by itself)")
    if len(config['per_class']) != 2 or min(config['per_class']) < 0:
        raise UserError(f"--per_class takes [correct, wrong] counts, got {config['per_class']}")
    for key in ('random_labels_epochs', 'random_labels_subset'):
        if config[key] < 0:
            raise UserError(f"--{key} must be >= 0, got {config[key]}")
    if config['random_labels_epochs'] and config['sanity_images'] <= 0:
        raise UserError("--random_labels_epochs needs --sanity_images > 0 (the images both checks explain)")
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
                               'dataset': dataset_names()})
