"""Exercise 1.3 — depth in CNNs: plain stacks stop improving, residual ones keep going.

The lab repeats exercise 1.2's depth study with CNNs on CIFAR-10: deeper CNNs without
residual connections do not always work better, even deeper ones with residual connections
do. models.CNN builds both from one stage design (conv-BN-ReLU-[Dropout]-MaxPool, then `depth`
blocks of two 3x3 convs, with or without the identity shortcut), so "depth d" has the same
layers and parameters in both variants.

The default run trains a residual CNN (widths 128/256/512, one block per stage: a ResNet-9
layout) on CIFAR-10 with a short one-cycle SGD schedule, data and augmentation on the GPU,
bf16 and channels_last. The aim, from published recipes of this size, is >= 94% test accuracy
in under 30 s on one H100/H200 — NOT a measurement of this code (no CIFAR-10 and no GPU where
it was written). What was measured (Fashion-MNIST on a CPU) and the
commands are in docs/exercise_1_3.md.

Three parts, chosen with --part (default: single):
  single  one CNN with the full training budget (the default: CIFAR-10, residual).
  study   plain vs residual at each of `depths`, same widths, optimiser and epochs; each
          model's lr picked per depth from one grid on the validation split (study_lrs, first
          of study_seeds), then repeated with the other seeds: runs/exercise_1_3/study.csv,
          study_summary.csv, study.json, study_acc.png, study_loss.png; re-running skips
          finished cells and resumes an interrupted one (study.run_seeded_study, shared with 1.2).
          The study cells start from He init (study_init; `--study_init torch` for PyTorch's default).
  grads   per-layer ||dL/dW|| * ||W|| on one training batch, at initialisation and after
          training, for every study cell: runs/exercise_1_3/grad_norms.png (exercise_2_1.py
          --study cnn analyses the same cells four ways).

The best-on-val checkpoint of a single run, which exercise 2.3 (CAM) explains, is
    <runs_dir>/exercise_1_3/<run_name>/checkpoints/best.pt
with run_name '<model>-cnn-d<depth>-<dataset>-<timestamp>' unless --run_name is given
(study cells: <runs_dir>/exercise_1_3/study-<model>-d<depth>-<id>/checkpoints/best.pt, <id> a hash
of the cell's settings, see study.py);
evaluate.load_model(path) rebuilds it, model.features gives the final feature maps and
model.classifier the linear head.

    python exercise_1_3.py                                     # CIFAR-10, downloaded to ./data
    python exercise_1_3.py --dataset fashion_mnist             # its own recipe: dataset.DATASETS
    python exercise_1_3.py --part study --dataset fashion_mnist --subset 10000
    python exercise_1_3.py --help                                 # every key, default and reason
"""

from config import COMMON, STUDY, UserError, cli, plural, resume_may_change
from dataset import Data, dataset_names, with_defaults
from models import CNN, INITS
from study import GRID_KEYS, check_grid, run_parts
from training import train_run

EXERCISE = 'exercise_1_3'

config = {
    **COMMON,
    'dataset': 'cifar10',           # cifar10 | fashion_mnist | mnist | digits; the last three change keys below (dataset.DATASETS)
    'augment': True,                # train split: random crop (pad H//8, zeros) + flip (cifar10, fashion_mnist)
    # model
    'part': 'single',               # single | study | grads | all
    'model': 'residual',            # plain | residual: the same layers, with or without identity shortcuts
    'widths': [128, 256, 512],      # channels per stage, each halves the resolution; fashion_mnist, mnist: [32, 64, 128]; digits: [32, 64]
    'depth': 1,                     # 2-conv blocks per stage after its conv-pool; 0 = the reference design
    'kernel_size': 3,               # of each stage's first conv (blocks are 3x3, as in BasicBlock)
    'stride': 1,                    # of each stage's first conv; MaxPool does the downsampling
    'padding': 1,                   # of each stage's first conv; 'same' for 3x3
    'dropout': 0.0,                 # after each stage's first ReLU; augmentation regularises enough
    'init': 'torch',                # torch (PyTorch's default) | he (models.he_init; residual blocks' last BN weight 1/sqrt(depth))
    # optimisation: the ResNet-9 (DAWNBench) recipe, shortened with label smoothing
    'epochs': 20,                   # a short one-cycle run, as ResNet-9 recipes use; aim >= 94% (unmeasured); fashion_mnist, mnist: 15
    'batch_size': 512,              # keeps a GPU busy, 88 steps/epoch on CIFAR-10; fashion_mnist, mnist, digits: 128
    'optimizer': 'sgd',             # Nesterov momentum (see momentum): the CIFAR ResNet standard
    'lr': 0.2,                      # peak, for the batch mean loss at batch 512 (0.1 per 256); fashion_mnist, mnist: 0.1; digits: 0.05
    'momentum': 0.9,                # onecycle cycles it 0.95 -> 0.85 -> 0.95 against the lr
    'weight_decay': 5e-4,           # L2, the usual CIFAR value for SGD
    'scheduler': 'onecycle',        # warm up 25% of steps, then anneal: the fast-schedule standard
    'label_smoothing': 0.2,         # as airbench's CIFAR-10 runs; helps most in short schedules; fashion_mnist, mnist: 0.1
    'val_split': 0.1,               # 45k train / 5k val for picking best.pt; test is touched once
    # depth study and gradient analysis (same optimisation keys as above)
    'depths': [1, 2, 4, 8],         # blocks per stage of each study cell: 9, 15, 27, 51 conv layers
    'study_widths': [64, 128, 256], # widths of every study cell: cheaper than the default run; digits: [32, 64]
    'study_epochs': 10,             # epochs per study cell: the same budget for both models
    'study_init': 'he',             # init of every study cell: the same principled init for both models
    'study_seeds': [0, 1, 2],       # per (model, depth): the first picks the lr, the others repeat the chosen lr (mean and spread)
    'study_lrs': [0.05, 0.1, 0.2],  # lr grid picked on val with the first seed, same for both models; [] = just lr. Factor 2 around the 28 px sets' 0.1; holds cifar10's 0.2 and digits' 0.05
}
ROLE = dict.fromkeys(('study_widths', 'study_epochs', 'study_init', 'study_seeds', 'study_lrs'), STUDY)  # config.ROLE: the rest
STUDY_KEYS = resume_may_change(config, ROLE)  # a resumed single run may change these


def with_dataset_defaults(config: dict, overrides: dict) -> dict:
    """config with the dataset's defaults for 1.3 (dataset.DATASETS) for every key the user did not give."""
    return with_defaults(EXERCISE, config, overrides)


def study_config(config: dict) -> dict:
    """The settings every study cell shares (all but model and depth; a seeded study sets lr and seed
    per cell, and its grid, study.GRID_KEYS, is no cell's setting); exercise 2.1 reuses them."""
    shared = {k: v for k, v in config.items() if k not in GRID_KEYS}
    return {**shared, 'widths': config['study_widths'], 'epochs': config['study_epochs'],
            'init': config['study_init'], 'resume': ''}


def build_model(config: dict, data: Data) -> CNN:
    """config['model'] ('plain' | 'residual') with config['depth'] blocks per stage of config['widths']."""
    if config['model'] not in ('plain', 'residual'):
        raise UserError(f"unknown model {config['model']!r}; choose plain or residual")
    return CNN(data.shape[0], data.num_classes, config['widths'], depth=config['depth'], variant=config['model'],
               kernel_size=config['kernel_size'], stride=config['stride'], padding=config['padding'],
               dropout=config['dropout'], init=config['init'])


def main(config: dict, overrides: dict) -> None:
    if config['part'] not in ('single', 'study', 'grads', 'all'):
        raise UserError(f"unknown part {config['part']!r}; choose single, study, grads or all")
    check_grid(config['study_seeds'], config['study_lrs'])  # before the single run trains
    config = with_dataset_defaults(config, overrides)
    if config['part'] in ('single', 'all'):
        train_run(EXERCISE, config, build_model, overrides, name=f"{config['model']}-cnn-d{config['depth']}",
                  may_change=STUDY_KEYS)

    # the study and the gradient analysis: every cell shares everything but model and depth
    study = study_config(config)
    subset = f" (subset {config['subset']})" if config['subset'] else ''
    run_parts(EXERCISE, config, study, build_model, xlabel='blocks per stage',
              title=f"{config['dataset']}{subset}, widths {study['widths']}, {plural(study['epochs'], 'epoch')}, "
                    f"init {study['init']}")

if __name__ == '__main__':
    cli(main, config, choices={'dataset': dataset_names(),
                               'part': ('single', 'study', 'grads', 'all'), 'model': ('plain', 'residual'),
                               'init': INITS, 'study_init': INITS})
