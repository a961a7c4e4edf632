"""Exercise 2.2: a trained classifier, fully convolutionalized, as a detector of handwritten digits.

classifier (trained with the shared loop and reused, or --checkpoint) -> surgery -> two tracks (A: zero-shot;
B: fine-tuned with a background class) -> COCO mAP, P / R / F1, count accuracy and ms per canvas on
test-split canvases, the threshold chosen on val-split ones -> figures, results.json, TensorBoard / W&B.
What each step does and the measured numbers: docs/exercise_2_2.md.

    python exercise_2_2.py                                     # MNIST, downloaded to ./data
    python exercise_2_2.py --dataset fashion_mnist --data_dir /path/with/FashionMNIST
    python exercise_2_2.py --checkpoint runs/exercise_1_1/<run>/checkpoints/best.pt --model mlp
    python exercise_2_2.py --help                              # every key, default and reason
"""
import hashlib
import json
import os
import time

import torch
from torch import nn

import canvases
import detect
import detect_metrics
from config import AFTER, CHOOSES, COMMON, DATA, RECIPE, RESULT, UserError, check, cli, keys_with
from dataset import Data, dataset_names, load_data
from detect_display import figures, log_tables, print_results
from device import device_info
from evaluate import check_model_on_data, load_model
from files import write_json
from models import CNN, MLP
from record import Run
from rundir import run_dir_of
from training import cached_run, digest

EXERCISE = 'exercise_2_2'
HERE = os.path.dirname(os.path.abspath(__file__))

config = {
    **COMMON,
    'dataset': 'mnist',             # mnist | fashion_mnist: a 1-channel 28x28 set (digits is 8x8: refused)
    'checkpoint': '',               # a CNN or MLP best.pt to convert; '' = train one (or reuse an identical one)
    # the classifier trained when there is no --checkpoint
    'model': 'cnn',                 # cnn (stride 8, ~5 ms per canvas) | mlp (stride 1, a 28x28 conv: far slower)
    'widths': [32, 64, 128],        # CNN channels per stage; three MaxPool(2) -> output stride 8
    'depth': 0,                     # CNN blocks per stage; 0 keeps the receptive field at 38 px (1: 94 px)
    'hidden': [1024, 1024],         # MLP hidden widths (exercise 1.1's)
    'dropout': 0.0,                 # after each stage / hidden ReLU
    'augment': True,                # classifier: random crop (pad 3) [+ flip on fashion_mnist]: shift tolerance
    'black_is_zero': False,         # classifier: normalise as x / std, so its zero padding is black like the canvas
    'epochs': 6,                    # classifier epochs (depth-0 CNN: ~1 min each on one CPU thread)
    'batch_size': 128,              # classifier and fine-tune
    'optimizer': 'adamw',           # classifier and fine-tune
    'lr': 2e-3,                     # classifier peak lr, cosine-annealed per step
    'weight_decay': 0.05,           # decoupled (adamw)
    'label_smoothing': 0.1,         # classifier and fine-tune
    # track B: fine-tuning with a background class
    'finetune_canvases': 4000,      # TRAIN-split canvases the crops are cut from (~3 crops per object)
    'finetune_epochs': 3,           # passes over those crops
    'finetune_lr': 1e-3,            # peak lr of the fine-tune, cosine-annealed
    'random_crops': 3,              # per canvas: crops anywhere (mostly empty or partial -> background)
    'max_shift': 4,                 # px: crops centred this near an object (y, x; +0.5 if odd-sized) are its class
    'finetune_context': True,       # fine-tune on each window with the canvas around it that its output sees
    'ignore_shift': 4,              # px: crops between max_shift and this off an object are not trained on (= max_shift: none)
    # canvases
    'canvas_size': 100,             # px, square, black
    'objects': [3, 6],              # images per canvas, [min, max]
    'object_size': [28, 28],        # px, [min, max]: each image scaled to a size drawn from this (jitter e.g. [20, 36])
    'min_gap': 2,                   # px between ink boxes, so no two objects touch
    'ink_threshold': 32,            # uint8 level above which a pixel is ink (boxes: tight around the ink)
    'canvas_seed': 0,               # test canvases; val and fine-tune canvases use other streams of it
    'test_canvases': 1000,          # from the TEST split: the reported metrics
    'val_canvases': 300,            # from the VAL split: the score threshold is chosen on these
    # decoding
    'score_threshold': -1.0,        # < 0: best F1 on the val canvases; else this fixed softmax score
    'min_score': 0.05,              # lowest peak kept for the ranked list behind mAP and the PR curve
    'peak_window': 1,               # a detection is a local max over this many positions a side of its class map (1: all; NMS merges)
    'nms_iou': 0.3,                 # per-class NMS; true objects never overlap, so any real overlap is a duplicate
    'agnostic_iou': 1.0,            # then class-agnostic NMS for the output (P/R/F1, count): one label per object; 1 = off
    'agnostic_overlap': 0.5,        # ... and a box covered more than this (of the smaller box) by a better one goes; 1 = off
    'refine_margin': 4,             # px: ink components this far outside a detection's crop still count as its own
    'refine_central': True,         # box: only the ink components reaching the window's central half; no whole one: no box
    'timing_threads': 1,            # torch threads while timing ms per canvas (batch 1)
    'box_ablation': True,           # also score each track with raw window boxes and / or without the no-ink rule
    'figure_canvases': 4,           # test canvases drawn with their boxes
    'assets': False,                # opt-in: also copy the figures to assets_dir/ex22_*.png (the docs' figures)
    'assets_dir': 'assets',         # relative to this script's folder unless absolute
}
CHOICES = {'dataset': dataset_names(channels=1, size=28), 'model': ('cnn', 'mlp')}

# What each key shapes (config.ROLE for the rest): a finished stage run with the same values is reused. The
# fine-tune's identity is the classifier's file digest plus the shared data and recipe keys and its own
# (RESULT: every key declared nowhere); decoding, scoring and figures are read only after training.
CLASSIFIER, FINETUNE = 'classifier', 'finetune'
# checkpoint picks the classifier (its file digest stands for it). sync_bn (no effect in one process) and
# box_ablation (read after training) have been in the fine-tune's identity since the first records: kept there.
ROLE = {
    'checkpoint': CHOOSES,
    **dict.fromkeys(('model', 'widths', 'depth', 'hidden', 'dropout', 'augment', 'black_is_zero', 'epochs', 'lr'),
                    CLASSIFIER),
    **dict.fromkeys(('sync_bn', 'box_ablation'), FINETUNE),
    **dict.fromkeys(('test_canvases', 'val_canvases', 'score_threshold', 'min_score', 'peak_window', 'nms_iou',
                     'agnostic_iou', 'agnostic_overlap', 'refine_margin', 'refine_central', 'timing_threads',
                     'figure_canvases', 'assets', 'assets_dir'), AFTER),
}
CLASSIFIER_KEYS = keys_with(config, DATA, RECIPE, CLASSIFIER, declared=ROLE)
FINETUNE_KEYS = keys_with(config, DATA, RECIPE, FINETUNE, RESULT, declared=ROLE)
CLASSIFIER_CHECKPOINT = ("a 10-class models.CNN or models.MLP trained on 28x28 mnist or fashion_mnist (a best.pt of "
                         "exercise 1.1 or 1.3, or of 2.2's classifier stage)")
TRACKS = {'zero_shot': 'A: zero-shot (surgery only)', 'background': 'B: + background class'}
TARGETS = {'mnist, track B': {'map_50': 0.98, 'count_acc': 0.95},  # issue 22's goals on 1,000 real-MNIST canvases
           'mnist, track A': {'map_50': 0.60}}

# (key, test, what the value must be): 2.2's own keys, for config.check before any work; the canvas keys'
# rows are canvases.LIMITS, the decoding keys' detect.LIMITS
LIMITS = [
    *[(key, lambda v: v >= 1, '>= 1') for key in ('finetune_canvases', 'finetune_epochs', 'test_canvases',
                                                    'val_canvases', 'timing_threads')],
    *[(key, lambda v: v >= 0, '>= 0') for key in ('random_crops', 'figure_canvases')],
    ('finetune_lr', lambda v: v > 0, '> 0'),
]


# The box ablation: which part of each number the network earns. (refine, drop_empty) of detect.Decoding,
# and the ground truth scored against (canvases.Canvases.targets): tight ink boxes, or each image's placed square.
ABLATION = {'ink_refined_no_ink_dropped': (True, True, 'ink'),     # the detector as reported
            'ink_refined_all_windows': (True, False, 'ink'),       # no hand-made objectness: empty windows stay
            'raw_windows_no_ink_dropped': (False, True, 'ink'),    # the network's own box: the window it fired in
            'raw_windows_all_windows': (False, False, 'ink'),      # the network alone: no ink heuristics at all
            'raw_windows_vs_placement': (False, False, 'placement')}  # the network alone vs the placed squares
ABLATION_METRICS = ('map_50', 'map', 'precision', 'recall', 'f1', 'count_acc', 'threshold')


# ---------------------------------------------------------------------------------------------
# Training stages (ordinary runs; reused when their identity matches)

def stage_name(kind: str, stage_config: dict, identity: dict) -> str:
    return f"{kind}-{stage_config['dataset']}-{digest(identity)}"


def train_stage(kind: str, stage_config: dict, identity: dict, make_data, build_model) -> tuple[str, dict]:
    """runs/exercise_2_2/<kind>-<dataset>-<digest of identity>, through training.cached_run: reused if
    finished, resumed if interrupted, else trained on make_data(config, device) with
    build_model(config, data). Returns (best.pt path, results)."""
    run_dir, results = cached_run(EXERCISE, stage_config, stage_name(kind, stage_config, identity),
                                  build_model, make_data, tags=[kind])
    return os.path.join(run_dir, 'checkpoints', 'best.pt'), results


def stage_results(checkpoint: str) -> dict:
    """results.json of the run a checkpoint belongs to ({} if there is none)."""
    try:
        with open(os.path.join(run_dir_of(checkpoint), 'results.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_classifier(config: dict, data: Data) -> nn.Module:
    c, h, w = data.shape
    if config['model'] == 'mlp':
        return MLP(c * h * w, config['hidden'], data.num_classes, dropout=config['dropout'])
    return CNN(c, data.num_classes, config['widths'], depth=config['depth'], variant='plain',
               dropout=config['dropout'])


def classifier_data(classifier: nn.Module, ckpt: dict, path: str, config: dict, overrides: dict) -> Data:
    """The classifier's own dataset (its checkpoint's config), checked to suit the canvases."""
    try:  # a model that cannot be converted stops here
        detect.fully_convolutionalize(classifier, (1, canvases.WINDOW, canvases.WINDOW))
    except UserError as e:
        raise UserError(f"{path}: {e}; expected {CLASSIFIER_CHECKPOINT}") from None
    data_config = {**ckpt.config, 'subset': config['subset'], 'augment': False}
    if 'data_dir' in overrides or config['checkpoint'] == '':
        data_config['data_dir'] = config['data_dir']
    if data_config['dataset'] != config['dataset']:
        print(f"--dataset {config['dataset']} ignored: {path} was trained on {data_config['dataset']}")
    data = load_data(data_config, 'cpu')
    if data.shape != (1, canvases.WINDOW, canvases.WINDOW):
        raise UserError(f"{path} was trained on {data.name} ({'x'.join(map(str, data.shape))} images), but "
                        f"canvases need 1-channel 28x28 images: use an mnist or fashion_mnist classifier")
    check_model_on_data(classifier, data, path, CLASSIFIER_CHECKPOINT)
    return data


def background_stage(config: dict, stage: dict, data: Data, classifier_path: str) -> tuple[nn.Module, dict]:
    """Track B's classifier: fine-tuned with a background class on crops (reused when identical).
    Returns the model and its record for results.json."""
    crops_made: dict = {}  # filled only when the crops are cut (not when a finished stage is reused)
    geometry = detect.fully_convolutionalize(load_model(classifier_path)[0], data.shape).geometry
    margin = detect.context_margin(geometry) if config['finetune_context'] else 0

    def make_crops(_: dict, device: torch.device) -> Data:
        t0 = time.perf_counter()
        crops, crops_made['crops'] = canvases.crop_data(data, config, device, margin)
        crops_made['crop_seconds'] = time.perf_counter() - t0
        print(f"background crops in {crops_made['crop_seconds']:.1f} s: {canvases.crop_summary(crops_made['crops'])}")
        return crops
    finetune_config = {**stage, 'dataset': data.name, 'epochs': config['finetune_epochs'],
                       'lr': config['finetune_lr'], 'checkpoint': classifier_path, 'augment': False}
    with open(classifier_path, 'rb') as f:  # the classifier's file stands for its own keys
        identity = {'classifier': hashlib.file_digest(f, 'sha256').hexdigest()[:8],
                    **{k: config[k] for k in FINETUNE_KEYS}}
    path, results = train_stage('background', finetune_config, identity, make_crops,
                                lambda c, d: finetune_model(classifier_path, geometry, margin))
    return load_model(path)[0], {'checkpoint': path, 'crop_test_acc': results.get('test_acc'), 'context_px': margin,
                                 'train_seconds': results.get('train_seconds'), **(crops_made or {'reused': True})}


def finetune_model(classifier_path: str, geometry: detect.Geometry, margin: int) -> nn.Module:
    """Track B's starting point: the classifier with a background output, set to see its window's
    surroundings when the fine-tune is in context (margin > 0)."""
    model = detect.with_background(load_model(classifier_path)[0])
    return detect.in_context(model, geometry) if margin else model


# ---------------------------------------------------------------------------------------------
# Tracks and the box ablation: detect.score on the val and test canvases

def run_track(model: nn.Module, data: Data, val: canvases.Canvases, test: canvases.Canvases, config: dict) -> dict:
    """Surgery, then detect.score (threshold fixed or chosen on val), ms per canvas, the surgery check
    and (--box_ablation) the box ablation."""
    fcn = detect.fully_convolutionalize(model, data.shape)
    mean, std = data.train.mean.cpu(), data.train.std.cpu()
    fixed = config['score_threshold'] >= 0
    t0 = time.perf_counter()
    decoding = detect.Decoding.from_config(config, len(data.classes))
    score = detect.score(fcn, val, test, mean, std, decoding, config['score_threshold'] if fixed else None)
    ms = detect.time_per_canvas(fcn, test, mean, std, decoding, score.threshold, config['timing_threads'])
    metrics = {**score.metrics, 'ms_per_canvas': ms, 'threshold': score.threshold,
               'threshold_from': ('fixed (--score_threshold)' if fixed else
                                  f"best F1 at IoU >= 0.5 on {len(val)} val-split canvases"),
               'detections': score.detections, 'objects': score.objects, 'eval_seconds': time.perf_counter() - t0,
               'geometry': vars(fcn.geometry),
               'surgery': detect.surgery_check(model, fcn, data.test.normalize(data.test.x[:256]).cpu(),
                                               config['canvas_size']),
               'pr_curve': detect_metrics.thin(score.curve),
               'errors': detect_metrics.count_errors(score.output, test.targets(), score.threshold)}
    ablation = box_ablation(fcn, data, val, test, config, metrics) if config['box_ablation'] else None
    return {'metrics': metrics, 'preds': detect_metrics.above(score.output, score.threshold), 'maps': score.first_maps,
            'geometry': fcn.geometry, 'ablation': ablation}


def box_ablation(fcn: detect.FullyConvolutional, data: Data, val: canvases.Canvases, test: canvases.Canvases,
                 config: dict, reported: dict) -> dict:
    """The track scored with the decoder's ink heuristics switched off, each variant at its own
    best-F1 threshold on the val canvases. The first variant is the track as reported (not recomputed)."""
    mean, std = data.train.mean.cpu(), data.train.std.cpu()
    out = {'ink_refined_no_ink_dropped': {k: reported[k] for k in ABLATION_METRICS}}
    for name, (refine, drop_empty, truth) in list(ABLATION.items())[1:]:
        decoding = detect.Decoding.from_config(config, len(data.classes), refine, drop_empty)
        score = detect.score(fcn, val, test, mean, std, decoding, truth=truth)
        out[name] = {k: score.threshold if k == 'threshold' else score.metrics[k] for k in ABLATION_METRICS}
    return out


# ---------------------------------------------------------------------------------------------

def main(config: dict, overrides: dict) -> dict:
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError("exercise 2.2 runs as one process (its stages are small): start it with python, not torchrun")
    if config['resume']:
        raise UserError("exercise 2.2 takes no --resume: run the same command again (finished stages are reused, "
                        "an interrupted one resumes by itself)")
    check(config, limits=[*LIMITS, *canvases.LIMITS, *detect.LIMITS])
    canvases.check_fits(config['canvas_size'], config['objects'], config['object_size'], config['min_gap'])
    if config['ignore_shift'] < config['max_shift']:
        raise UserError(f"--ignore_shift {config['ignore_shift']} must be >= --max_shift {config['max_shift']} "
                        f"(crops up to max_shift px off an object are its class; the ignore zone lies beyond)")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    stage = {**config, 'checkpoint': '', 'wandb_verbose': config.get('wandb_verbose', False)}
    classifier_identity = {k: config[k] for k in CLASSIFIER_KEYS}

    # 1. the classifier, given or trained; the detection run first, so its name is checked before any training
    if config['checkpoint']:
        path = config['checkpoint']
        classifier, ckpt = load_model(path, expect=(CNN, MLP), what=CLASSIFIER_CHECKPOINT)
        model_class, dataset = ckpt.model_class, ckpt.config['dataset']
    else:
        path = os.path.join(config['runs_dir'], EXERCISE, stage_name('classifier', stage, classifier_identity),
                            'checkpoints', 'best.pt')
        model_class, dataset = {'cnn': 'CNN', 'mlp': 'MLP'}[config['model']], config['dataset']
    run = Run(EXERCISE, {**config, 'checkpoint': path, 'dataset': dataset}, overrides,
              name=f"detect-{model_class.lower()}", tags=['detection'])
    if not config['checkpoint']:
        train_stage('classifier', stage, classifier_identity, load_data, build_classifier)
        classifier, ckpt = load_model(path, expect=(CNN, MLP), what=CLASSIFIER_CHECKPOINT)
    data = classifier_data(classifier, ckpt, path, config, overrides)

    # 2. track B's classifier; 3. canvases: val (threshold) from the val split, test (metrics) from the test split
    background, background_record = background_stage(config, stage, data, path)
    val = canvases.make_canvases(data.val.x, data.val.y, config['val_canvases'], [config['canvas_seed'], 1],
                                 **canvases.canvas_keys(config))
    test = canvases.make_canvases(data.test.x, data.test.y, config['test_canvases'], [config['canvas_seed'], 0],
                                  **canvases.canvas_keys(config))

    # 4. the two tracks and the box ablation
    config = run.config
    models = {'zero_shot': classifier, 'background': background}
    tracks = {name: run_track(model, data, val, test, config) for name, model in models.items()}

    # 5. records: results.json, figures, tables; run.finish adds W&B's summary and TensorBoard's HParams
    results = {
        'dataset': data.name, 'classes': data.classes,
        'classifier': {'checkpoint': path, 'model_class': ckpt.model_class, 'model_args': ckpt.model_args,
                       'test_acc': stage_results(path).get('test_acc')},
        'background_classifier': background_record,
        'canvases': {**canvases.canvas_keys(config),
                     'test': {'split': 'test', 'n': len(test), 'seed': [config['canvas_seed'], 0],
                              'objects': sum(len(b) for b in test.boxes)},
                     'val': {'split': 'val', 'n': len(val), 'seed': [config['canvas_seed'], 1]}},
        'tracks': {name: t['metrics'] for name, t in tracks.items()},
        'box_ablation': {n: t['ablation'] for n, t in tracks.items()} if config['box_ablation'] else None,
        'box_ablation_means': {k: {'refine': r, 'drop_empty': d, 'truth': t} for k, (r, d, t) in ABLATION.items()},
        'targets': TARGETS,
        'hardware': {**device_info(torch.device('cpu')), 'torch_version': torch.__version__,
                     'load_average_start': load_start, 'load_average_end': os.getloadavg()},
        'seconds': time.perf_counter() - t_start,
    }
    write_records(run, results, figures(tracks, TRACKS, data, test, config), data, config)
    return results


def write_records(run: Run, results: dict, figs: dict, data: Data, config: dict) -> None:
    """One-off results go to results.json, the tables (TensorBoard text, W&B tables) and run.finish
    (W&B summary, HParams), not to the scalar history: that holds curves only."""
    log_tables(run, results)
    results['figures'] = run.log_figures(figs, os.path.join(HERE, config['assets_dir']) if config['assets'] else None,
                                         'ex22_')
    results['provenance'] = run.provenance(data)
    write_json(run.path('results.json'), results)
    print_results(results, TRACKS)
    print(f"-> {run.path('results.json')}")
    run.finish(results)


if __name__ == '__main__':
    cli(main, config, choices=CHOICES)
