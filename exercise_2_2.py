"""Exercise 2.2 — a trained classifier, fully convolutionalized, as a detector of handwritten digits.

The lab: "Take one of your trained classifiers and fully-convolutionalize it, so that it predicts
classification outputs at all pixels of an input image. Can you turn this into a detector of
handwritten digits?" Test images are real test-split images placed on a larger black canvas.

  1. classifier  a CNN (models.CNN, exercise 1.3's reference design at 28 px) trained with the shared
                 loop, or --checkpoint PATH (a CNN or MLP best.pt). A finished classifier run with the
                 same config is reused (its run name carries a hash of that config).
  2. surgery     detect.fully_convolutionalize: the same weights as a conv net, one score map per class
                 (output stride, receptive field and offset traced from the layers).
  3. two tracks  A zero_shot: the classifier itself, surgery only.
                 B background: the classifier fine-tuned with an 11th class, background, on crops cut
                 from TRAIN-split canvases (centred +-max_shift px = the object's class; off-centre,
                 partial and empty crops = background), then the same surgery. Reused like step 1.
  4. decoding    per-class local maxima of the softmax maps -> the crop each stands for -> refined to
                 the ink inside -> per-class NMS: the ranked list COCO mAP is computed on. The
                 detector's output then keeps one label per object (class-agnostic NMS) and the
                 scores above a threshold: the best-F1 one on canvases from the VAL split. The test
                 split never selects anything.
  5. metrics     on `test_canvases` fixed-seed canvases from the TEST split: COCO mAP@0.5,
                 mAP@[.5:.95], mAR@100 (torchmetrics), and on the output P / R / F1 at IoU >= 0.5,
                 exact-count accuracy, ms per canvas (batch 1, `timing_threads` threads).

Writes runs/exercise_2_2/<run>/{results.json, detections.png, score_maps.png, pr_curve.png},
TensorBoard and W&B; the classifier and fine-tune stages are ordinary runs beside it. With
--assets True, the figures are also copied to assets/ex22_*.png. Measured results are in docs/exercise_2_2.md.

    python exercise_2_2.py                                     # MNIST, downloaded to ./data
    python exercise_2_2.py --dataset fashion_mnist --data_dir /path/with/FashionMNIST
    python exercise_2_2.py --checkpoint runs/exercise_1_1/<run>/checkpoints/best.pt --model mlp
    python exercise_2_2.py --help                              # every key, default and reason
"""
import hashlib
import json
import os
import platform
import time

import torch
from torch import nn

import detect
from config import COMMON, HOW_IT_RUNS, UserError, cli
from dataset import Data, Split, load_data
from evaluate import check_model_on_data, load_model
from files import write_json
from models import CNN, MLP
from record import Run
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
    'nms_iou': 0.3,                 # per-class NMS; true objects never overlap, so any real overlap is a duplicate
    'agnostic_iou': 0.3,            # then class-agnostic NMS for the output (P/R/F1, count): one label per object; 1 = off
    'refine_margin': 4,             # px: ink components this far outside a detection's crop still count as its own
    'timing_threads': 1,            # torch threads while timing ms per canvas (batch 1)
    'box_ablation': True,           # also score each track with raw window boxes and / or without the no-ink rule
    'figure_canvases': 4,           # test canvases drawn with their boxes
    'assets': False,                # opt-in: also copy the figures to assets_dir/ex22_*.png (the docs' figures)
    'assets_dir': 'assets',         # relative to this script's folder unless absolute
}
CHOICES = {'dataset': ('mnist', 'fashion_mnist'), 'model': ('cnn', 'mlp')}

# The keys that shape each training stage: a finished stage run with the same values is reused.
CLASSIFIER_KEYS = ('dataset', 'model', 'widths', 'depth', 'hidden', 'dropout', 'augment', 'epochs', 'batch_size',
                   'optimizer', 'lr', 'momentum', 'weight_decay', 'scheduler', 'label_smoothing', 'seed', 'subset',
                   'val_split', 'max_steps')
# The fine-tune's identity is the classifier's file digest plus every key but these: where and how it
# runs (config.HOW_IT_RUNS), the classifier's own keys (its digest stands for them) and the keys read
# only after training (decoding, the val/test canvases, timing, figures).
NOT_FINETUNE = HOW_IT_RUNS | {'checkpoint', 'model', 'widths', 'depth', 'hidden', 'dropout', 'augment', 'epochs', 'lr',
                              'test_canvases', 'val_canvases', 'score_threshold', 'min_score', 'nms_iou',
                              'agnostic_iou', 'refine_margin', 'timing_threads', 'figure_canvases', 'assets',
                              'assets_dir'}
FINETUNE_KEYS = tuple(k for k in config if k not in NOT_FINETUNE)
CLASSIFIER_CHECKPOINT = ("a 10-class models.CNN or models.MLP trained on 28x28 mnist or fashion_mnist (a best.pt of "
                         "exercise 1.1 or 1.3, or of 2.2's classifier stage)")
TRACKS = {'zero_shot': 'A: zero-shot (surgery only)', 'background': 'B: + background class'}
TARGETS = {'mnist, track B': {'map_50': 0.95, 'map': 0.75, 'f1': 0.95, 'count_acc': 0.85, 'ms_per_canvas': 20,
                              'finetune_minutes_2_cores': 5},
           'mnist, track A': {'map_50': 0.60}}


WINDOW = 28  # px: the classifier's input (1-channel 28x28 data), so the crop and detection window


def _pair(v) -> bool:
    return len(v) == 2 and all(type(i) is int for i in v) and 1 <= v[0] <= v[1]


# (key, test, what the value must be): 2.2's own keys, checked before any work (config.check does COMMON's)
LIMITS = [
    ('finetune_canvases', lambda v: v >= 1, '>= 1'),
    ('finetune_epochs', lambda v: v >= 1, '>= 1'),
    ('finetune_lr', lambda v: v > 0, '> 0'),
    ('random_crops', lambda v: v >= 0, '>= 0'),
    ('max_shift', lambda v: 0 <= v < 3 * WINDOW // 4,
     f'in [0, {3 * WINDOW // 4 - 1}]: off-centre (background) crops are shifted by more, up to 3/4 of the '
     f'{WINDOW} px window'),
    ('canvas_size', lambda v: v >= WINDOW, f'>= {WINDOW}, the classifier\'s window'),
    ('objects', _pair, '[min, max] whole numbers with 1 <= min <= max'),
    ('object_size', _pair, '[min, max] whole numbers with 1 <= min <= max'),
    ('min_gap', lambda v: v >= 0, '>= 0'),
    ('ink_threshold', lambda v: 0 <= v < 255, 'in [0, 254] (uint8 levels above it are ink)'),
    ('test_canvases', lambda v: v >= 1, '>= 1'),
    ('val_canvases', lambda v: v >= 1, '>= 1'),
    ('score_threshold', lambda v: v <= 1, '<= 1 (< 0: chosen on the val canvases)'),
    ('min_score', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('nms_iou', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('agnostic_iou', lambda v: 0 < v <= 1, 'in (0, 1] (1 = off)'),
    ('refine_margin', lambda v: v >= 0, '>= 0'),
    ('timing_threads', lambda v: v >= 1, '>= 1'),
    ('figure_canvases', lambda v: v >= 0, '>= 0'),
]


def check_settings(config: dict) -> None:
    """UserError for a setting that can never finish or makes no sense, before any work: every
    value in range, and max(objects) images of max(object_size) px surely fit the canvas."""
    for key, ok, what in LIMITS:
        if not ok(config[key]):
            raise UserError(f"--{key} must be {what}, got {config[key]!r}")
    detect.check_fits(config['canvas_size'], config['objects'], config['object_size'], config['min_gap'])


# ---------------------------------------------------------------------------------------------
# Training stages (ordinary runs; reused when their identity matches)

def file_digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:8]


def stage_name(kind: str, stage_config: dict, identity: dict) -> str:
    return f"{kind}-{stage_config['dataset']}-{digest(identity)}"


def train_stage(kind: str, stage_config: dict, identity: dict, make_data, build_model) -> tuple[str, dict]:
    """runs/exercise_2_2/<kind>-<dataset>-<digest of identity>, through study.cached_run: reused if
    finished, resumed if interrupted, else trained on make_data(config, device) with
    build_model(config, data). Returns (best.pt path, results)."""
    run_dir, results = cached_run(EXERCISE, stage_config, stage_name(kind, stage_config, identity),
                                  build_model, make_data, tags=[kind])
    return os.path.join(run_dir, 'checkpoints', 'best.pt'), results


def build_classifier(config: dict, data: Data) -> nn.Module:
    c, h, w = data.shape
    if config['model'] == 'mlp':
        return MLP(c * h * w, config['hidden'], data.num_classes, dropout=config['dropout'])
    return CNN(c, data.num_classes, config['widths'], depth=config['depth'], variant='plain',
               dropout=config['dropout'])


def with_background(model: nn.Module) -> nn.Module:
    """The same classifier with one more output (the background class, last), its old rows kept."""
    old = model.classifier
    new = nn.Linear(old.in_features, old.out_features + 1)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
    model.classifier = new
    model.args = {**model.args, 'num_classes': old.out_features + 1}
    return model


def crop_summary(counts: dict) -> str:
    """crop_data's counts as one line: 'train 140 (88 background, 12 canvases), val ...'."""
    return ', '.join(f"{split} {c['crops']:,} ({c['background']:,} background, {c['canvases']:,} "
                     f"canvas{'' if c['canvases'] == 1 else 'es'})" for split, c in counts.items())


def crop_data(data: Data, config: dict) -> tuple[Data, dict]:
    """Track B's 11-class crops (uint8, class 10 = background), cut from canvases of each split:
    train from the train split, val from the val split; test (reported, never selected on) from the
    test split with another seed than the test canvases. Normalised like the classifier's input."""
    keys = dict(canvas_size=config['canvas_size'], objects=config['objects'], object_size=config['object_size'],
                min_gap=config['min_gap'], ink_threshold=config['ink_threshold'])
    n = config['finetune_canvases']
    splits, counts = {}, {}
    for stream, (name, split, canvases) in enumerate((('train', data.train, n), ('val', data.val, max(n // 10, 1)),
                                                      ('test', data.test, max(n // 10, 1)))):
        seed = [config['canvas_seed'], 10 + stream]
        cv = detect.make_canvases(split.x, split.y, canvases, seed, **keys)
        x, y = detect.background_crops(cv, data.shape[-1], config['max_shift'], config['random_crops'], seed,
                                       background=data.num_classes)
        splits[name] = Split(x=x, y=y, mean=split.mean.cpu(), std=split.std.cpu())
        counts[name] = {'canvases': canvases, 'crops': len(y), 'background': int((y == data.num_classes).sum())}
    return Data(name=f'{data.name}-crops', classes=data.classes + ['background'], **splits), counts


# ---------------------------------------------------------------------------------------------
# One track: surgery, threshold on val canvases, metrics on test canvases

def surgery_check(model: nn.Module, fcn: detect.FullyConvolutional, x: torch.Tensor, canvas_size: int) -> dict:
    """How exactly the surgery reproduces the classifier, on normalised test images x (B, 1, w, w):
    on the images themselves, and with each image alone on a black canvas at a stride-aligned place."""
    g = fcn.geometry
    model = model.cpu().eval()
    with torch.no_grad():
        logits = model(x)
        alone = (fcn(x)[:, :, 0, 0] - logits).abs().max().item()
        i = (canvas_size - g.window) // 2 // g.stride             # a central output position
        black = x.amin().item()                                     # normalised black (MNIST-style data)
        canvas = torch.full((len(x), x.shape[1], canvas_size, canvas_size), black)
        canvas[:, :, g.stride * i:g.stride * i + g.window, g.stride * i:g.stride * i + g.window] = x
        placed = fcn(canvas)[:, :, i, i]
        crop_logits = model(canvas[:, :, g.stride * i:g.stride * i + g.window, g.stride * i:g.stride * i + g.window])
    return {'max_abs_diff_on_crops': alone, 'on_canvas_max_abs_diff': (placed - crop_logits).abs().max().item(),
            'on_canvas_top1_agreement': (placed.argmax(1) == crop_logits.argmax(1)).float().mean().item(),
            'images': len(x)}


def run_track(name: str, model: nn.Module, data: Data, val: detect.Canvases, test: detect.Canvases,
              config: dict) -> dict:
    fcn = detect.fully_convolutionalize(model, data.shape)
    mean, std = data.train.mean.cpu(), data.train.std.cpu()
    kw = dict(num_objects=len(data.classes), nms_iou=config['nms_iou'], ink_threshold=config['ink_threshold'],
              margin=config['refine_margin'])
    if config['score_threshold'] < 0:
        val_preds, _ = detect.detect(fcn, val, mean, std, threshold=config['min_score'], **kw)
        val_preds = [detect.agnostic_nms(p, config['agnostic_iou']) for p in val_preds]
        threshold = detect.best_threshold(*detect.match(val_preds, [val.targets(k) for k in range(len(val))]))
        chosen = f"best F1 at IoU >= 0.5 on {len(val)} val-split canvases"
    else:
        threshold, chosen = config['score_threshold'], 'fixed (--score_threshold)'
    t0 = time.perf_counter()
    preds, maps = detect.detect(fcn, test, mean, std, threshold=min(config['min_score'], threshold), **kw)
    targets = [test.targets(k) for k in range(len(test))]
    output = [detect.agnostic_nms(p, config['agnostic_iou']) for p in preds]  # what the detector reports
    scores, tp, n_gt = detect.match(output, targets)
    out = {**detect.coco_metrics(preds, targets), **detect.prf_at(scores, tp, n_gt, threshold),
           'count_acc': detect.count_accuracy(output, targets, threshold)}
    out['ms_per_canvas'] = detect.time_per_canvas(fcn, test, mean, std, threshold=threshold,
                                                  agnostic_iou=config['agnostic_iou'],
                                                  threads=config['timing_threads'], **kw)
    curve = detect.pr_curve(scores, tp, n_gt)
    x = data.test.normalize(data.test.x[:256]).cpu()
    out.update(threshold=threshold, threshold_from=chosen, detections=int((scores >= threshold).sum()),
               objects=n_gt, eval_seconds=time.perf_counter() - t0, geometry=vars(fcn.geometry),
               surgery=surgery_check(model, fcn, x, config['canvas_size']),
               pr_curve={k: v.tolist() for k, v in curve.items()})
    return {'metrics': out, 'preds': detect.above(output, threshold), 'maps': maps, 'geometry': fcn.geometry}


# The box ablation: which part of each number the network earns. (refine, drop_empty) of detect.decode.
ABLATION = {'ink_refined_no_ink_dropped': (True, True),     # the detector as reported
            'ink_refined_all_windows': (True, False),       # no hand-made objectness: empty windows stay
            'raw_windows_no_ink_dropped': (False, True),    # the network's own box: the window it fired in
            'raw_windows_all_windows': (False, False)}      # the network alone: no ink heuristics at all


def box_ablation(model: nn.Module, data: Data, val: detect.Canvases, test: detect.Canvases, config: dict,
                 reported: dict) -> dict:
    """The track's metrics with the two ink heuristics of the decoder switched off, each variant with
    its own best-F1 threshold on the val canvases (so no variant is judged at another's threshold).
    The first variant is the track as reported (`reported`, not recomputed)."""
    fcn = detect.fully_convolutionalize(model, data.shape)
    mean, std = data.train.mean.cpu(), data.train.std.cpu()
    kw = dict(num_objects=len(data.classes), nms_iou=config['nms_iou'], ink_threshold=config['ink_threshold'],
              margin=config['refine_margin'])
    keys = ('map_50', 'map', 'precision', 'recall', 'f1', 'count_acc', 'threshold')
    out = {'ink_refined_no_ink_dropped': {k: reported[k] for k in keys}}
    targets = [test.targets(k) for k in range(len(test))]
    for name, (refine, drop_empty) in list(ABLATION.items())[1:]:
        val_preds, _ = detect.detect(fcn, val, mean, std, threshold=config['min_score'], refine=refine,
                                     drop_empty=drop_empty, **kw)
        val_preds = [detect.agnostic_nms(p, config['agnostic_iou']) for p in val_preds]
        threshold = detect.best_threshold(*detect.match(val_preds, [val.targets(k) for k in range(len(val))]))
        preds, _ = detect.detect(fcn, test, mean, std, threshold=min(config['min_score'], threshold), refine=refine,
                                 drop_empty=drop_empty, **kw)
        output = [detect.agnostic_nms(p, config['agnostic_iou']) for p in preds]
        scores, tp, n_gt = detect.match(output, targets)
        m = {**detect.coco_metrics(preds, targets), **detect.prf_at(scores, tp, n_gt, threshold),
             'count_acc': detect.count_accuracy(output, targets, threshold), 'threshold': threshold}
        out[name] = {k: m[k] for k in keys}
    return out


def print_ablation(ablation: dict) -> None:
    print("\nbox ablation (each variant thresholded on the val canvases)")
    cols = ('map_50', 'map', 'f1', 'count_acc')
    print(f"  {'track':<26}{'variant':<28}" + ''.join(f"{k:>11}" for k in cols))
    for track, variants in ablation.items():
        for name, m in variants.items():
            print(f"  {TRACKS[track][:24]:<26}{name:<28}" + ''.join(f"{m[k]:>11.4f}" for k in cols))


# ---------------------------------------------------------------------------------------------

def hardware() -> dict:
    cpu = platform.processor() or ''
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'cuda': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            'torch_version': torch.__version__}


def main(config: dict, overrides: dict) -> dict:
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError("exercise 2.2 runs as one process (its stages are small): start it with python, not torchrun")
    if config['resume']:
        raise UserError("exercise 2.2 does not take --resume: a finished stage with the same config is reused and "
                        "an interrupted one resumes by itself; just run the same command again")
    check_settings(config)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    stage = {**config, 'checkpoint': '', 'wandb_verbose': config.get('wandb_verbose', False)}
    classifier_identity = {k: config[k] for k in CLASSIFIER_KEYS}

    # the detection run first: its name and --overwrite are checked before any stage trains
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

    # 1. the classifier: given, or trained (reused when an identical run finished)
    if not config['checkpoint']:
        train_stage('classifier', stage, classifier_identity, load_data, build_classifier)
        classifier, ckpt = load_model(path, expect=(CNN, MLP), what=CLASSIFIER_CHECKPOINT)
    try:  # a model that cannot be converted stops here
        detect.fully_convolutionalize(classifier, (1, WINDOW, WINDOW))
    except UserError as e:
        raise UserError(f"{path}: {e}; expected {CLASSIFIER_CHECKPOINT}") from None
    data_config = {**ckpt.config, 'subset': config['subset'], 'augment': False}
    if 'data_dir' in overrides or config['checkpoint'] == '':
        data_config['data_dir'] = config['data_dir']
    if data_config['dataset'] != config['dataset']:
        print(f"--dataset {config['dataset']} ignored: {path} was trained on {data_config['dataset']}")
    data = load_data(data_config, 'cpu')
    if data.shape != (1, WINDOW, WINDOW):
        raise UserError(f"{path} was trained on {data.name} ({'x'.join(map(str, data.shape))} images); "
                        f"canvases need 1-channel 28x28 images (mnist or fashion_mnist)")
    check_model_on_data(classifier, data, path, CLASSIFIER_CHECKPOINT)

    # 2. track B's classifier: fine-tuned with a background class (reused when identical)
    made: dict = {}

    def make_crops(_: dict, device: torch.device) -> Data:
        t0 = time.perf_counter()
        crops, made['crops'] = crop_data(data, config)
        made['crop_seconds'] = time.perf_counter() - t0
        print(f"background crops in {made['crop_seconds']:.1f} s: {crop_summary(made['crops'])}")
        for split in (crops.train, crops.val, crops.test):
            split.x, split.y, split.mean, split.std = (t.to(device) for t in (split.x, split.y, split.mean, split.std))
        return crops
    ft_config = {**stage, 'dataset': data.name, 'epochs': config['finetune_epochs'], 'lr': config['finetune_lr'],
                 'checkpoint': path, 'augment': False}
    bg_path, bg_results = train_stage('background', ft_config,
                                      {'classifier': file_digest(path), **{k: config[k] for k in FINETUNE_KEYS}},
                                      make_crops, lambda c, d: with_background(load_model(path)[0]))
    background, _ = load_model(bg_path)

    # 3. canvases: val (threshold) from the val split, test (metrics) from the test split
    keys = dict(canvas_size=config['canvas_size'], objects=config['objects'], object_size=config['object_size'],
                min_gap=config['min_gap'], ink_threshold=config['ink_threshold'])
    val = detect.make_canvases(data.val.x, data.val.y, config['val_canvases'], [config['canvas_seed'], 1], **keys)
    test = detect.make_canvases(data.test.x, data.test.y, config['test_canvases'], [config['canvas_seed'], 0], **keys)
    config = run.config
    tracks = {'zero_shot': run_track('zero_shot', classifier, data, val, test, config),
              'background': run_track('background', background, data, val, test, config)}
    models = {'zero_shot': classifier, 'background': background}
    ablation = ({n: box_ablation(models[n], data, val, test, config, t['metrics']) for n, t in tracks.items()}
                if config['box_ablation'] else None)

    # 4. records: results.json, figures, TensorBoard / W&B
    results = {
        'dataset': data.name, 'classes': data.classes,
        'classifier': {'checkpoint': path, 'model_class': ckpt.model_class, 'model_args': ckpt.model_args,
                       'test_acc': _results_of(path).get('test_acc')},
        'background_classifier': {'checkpoint': bg_path, 'crop_test_acc': bg_results.get('test_acc'),
                                  'train_seconds': bg_results.get('train_seconds'),
                                  **(made or {'reused': True})},
        'canvases': {**keys, 'test': {'split': 'test', 'n': len(test), 'seed': [config['canvas_seed'], 0],
                                      'objects': sum(len(b) for b in test.boxes)},
                     'val': {'split': 'val', 'n': len(val), 'seed': [config['canvas_seed'], 1]}},
        'tracks': {name: t['metrics'] for name, t in tracks.items()},
        'box_ablation': ablation,
        'box_ablation_means': {k: {'refine': r, 'drop_empty': d} for k, (r, d) in ABLATION.items()},
        'targets_unmeasured': TARGETS,
        'hardware': {**hardware(), 'load_average_start': load_start, 'load_average_end': os.getloadavg()},
        'seconds': time.perf_counter() - t_start,
    }
    for name, t in tracks.items():
        run.log({f'{name}/{k}': v for k, v in t['metrics'].items() if isinstance(v, (int, float))}, step=0)
    run.log_table('tracks', [{'track': name, **{k: v for k, v in t['metrics'].items() if isinstance(v, (int, float))}}
                             for name, t in tracks.items()])
    if ablation:  # what the console prints under "box ablation", in W&B and TensorBoard too
        run.log({f'{track}/ablation/{variant}/{k}': v for track, variants in ablation.items()
                 for variant, m in variants.items() for k, v in m.items()}, step=0)
        run.log_table('box_ablation', [{'track': track, 'variant': variant, **m}
                                       for track, variants in ablation.items() for variant, m in variants.items()])
    title = f"{data.name}: {len(test)} test-split canvases of {config['canvas_size']} px"
    figures = {
        'detections': detect.plot_detections(test, {TRACKS[n]: t['preds'] for n, t in tracks.items()}, data.classes,
                                             f"{title}; green dashed = ground truth, orange = detections above the "
                                             f"val-chosen threshold", list(range(min(config['figure_canvases'],
                                                                                     len(test))))),
        'score_maps': detect.plot_score_maps(test.images[0], {TRACKS[n]: t['maps'] for n, t in tracks.items()},
                                             data.classes, {TRACKS[n]: t['geometry'] for n, t in tracks.items()},
                                             f"softmax score maps of test canvas 0 (one cell per output position, "
                                             f"stride {tracks['background']['geometry'].stride} px)"),
        'pr_curve': detect.plot_pr({TRACKS[n]: {**t['metrics']['pr_curve'], 'threshold': t['metrics']['threshold'],
                                                'at': t['metrics']} for n, t in tracks.items()}, title),
    }
    results['figures'] = run.log_figures(figures, os.path.join(HERE, config['assets_dir']) if config['assets'] else None,
                                         'ex22_')
    results['provenance'] = run.provenance(data)
    write_json(run.path('results.json'), results)
    print_table(results)
    if ablation:
        print_ablation(ablation)
    print(f"-> {run.path('results.json')}")
    run.finish(results)
    return results


def _results_of(checkpoint: str) -> dict:
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(checkpoint)), 'results.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def print_table(results: dict) -> None:
    cols = [('map_50', 'mAP@0.5'), ('map', 'mAP@[.5:.95]'), ('mar_100', 'mAR@100'), ('precision', 'P'),
            ('recall', 'R'), ('f1', 'F1'), ('count_acc', 'count acc'), ('ms_per_canvas', 'ms/canvas'),
            ('threshold', 'threshold')]
    print(f"\n{results['dataset']}, {results['canvases']['test']['n']} test canvases")
    print(f"  {'track':<38}" + ''.join(f"{h:>13}" for _, h in cols))
    for name, m in results['tracks'].items():
        print(f"  {TRACKS[name]:<38}" + ''.join(f"{m[k]:>13.4f}" if k != 'ms_per_canvas' else f"{m[k]:>13.1f}"
                                                for k, _ in cols))


if __name__ == '__main__':
    cli(main, config, choices=CHOICES)
