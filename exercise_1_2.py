"""Exercise 1.2 — residual MLPs: deeper networks train when layers have skip connections.

The lab asks to compare plain MLPs and residual MLPs (SkipMLP) across depths, show that deep
networks train when they have residual connections, and explain why with the gradient norms
of every layer on one training batch. Three parts, chosen with --part:

  single  one (model, depth, width) run with the full training budget; the defaults train a
          SkipMLP that matches exercise 1.1's MLP. A W&B sweep agent runs exactly this.
  study   plain vs residual at each of `depths`, same width, optimiser, epochs and a fair
          setup for both: He init (study_init), no dropout (study_dropout), and each model's lr
          picked per depth from one grid on the validation split (study_lrs, first of
          study_seeds), then repeated with the other seeds; the old setup (PyTorch's default
          init, dropout 0.2) is `--study_init torch --study_dropout 0.2`.
          runs/exercise_1_2/study.csv (one row per cell, with a clean training loss: eval mode,
          training split), study_summary.csv (mean and spread over seeds), study.json,
          study_acc.png, study_loss.png. Re-running skips finished cells and resumes an
          interrupted one.
  grads   per-layer ||dL/dW|| * ||W|| (raw norms in the summary) at initialisation and after
          training, for every study cell: runs/exercise_1_2/grad_norms.png. Exercise 2.1
          (exercise_2_1.py) analyses the same cells four ways.

Measured results, and the data and hardware behind them, are in docs/exercise_1_2.md and docs/exercise_2_1.md.

    python exercise_1_2.py                                   # all three parts on MNIST
    python exercise_1_2.py --part single --model plain --depth 16
    python exercise_1_2.py --part study --dataset fashion_mnist --subset 10000
    wandb sweep sweeps/exercise_1_2.yaml                     # the study's grid as a W&B sweep
    python exercise_1_2.py --help                            # every key, default and reason
"""

from config import COMMON, STUDY, UserError, cli, plural, resume_may_change
from dataset import Data, dataset_names
from models import INITS, MLP, SkipMLP
from study import GRID_KEYS, check_grid, run_parts
from training import train_run

EXERCISE = 'exercise_1_2'

config = {
    **COMMON,
    'part': 'all',                  # single | study | grads | all
    'dataset': 'mnist',             # mnist | fashion_mnist | digits
    # optimisation: exercise 1.1's recipe, shared by the single run and the study
    'epochs': 20,                   # single run; the study uses study_epochs
    'batch_size': 128,              # samples per optimizer step
    'optimizer': 'adamw',           # Adam with decoupled weight decay
    'lr': 1e-3,                     # the usual Adam peak; cosine-annealed to 0 per step
    'weight_decay': 0.05,           # decoupled
    'scheduler': 'cosine',          # per step
    'label_smoothing': 0.1,         # as in exercise 1.1
    # model of the single run (the study varies model and depth)
    'model': 'residual',            # plain (models.MLP) | residual (models.SkipMLP)
    'depth': 4,                     # hidden Linear layers, counted as in MLP (SkipMLP adds an input layer)
    'width': 1024,                  # every hidden layer; the study uses study_width
    'block_size': 2,                # Linear layers per residual block
    'norm': False,                  # LayerNorm in residual blocks; off, so the skip is the only difference
    'dropout': 0.2,                 # plain: after every hidden ReLU; residual: after every ReLU (before each block Linear and the classifier)
    'init': 'torch',                # torch (PyTorch's default) | he (models.he_init; residual branches' last layer scaled down)
    # depth study and gradient analysis
    'depths': [2, 4, 8, 16, 32, 64],  # hidden layers of each study cell, for both models
    'study_width': 256,             # hidden width of every study cell
    'study_epochs': 3,              # epochs per study cell: the same small budget for both models
    'study_init': 'he',             # init of every study cell: the same principled init for both models
    'study_dropout': 0.0,           # dropout of every study cell: 3 epochs are not about regularisation, and dropout on a plain net's main path compounds with depth
    'study_seeds': [0, 1, 2],       # per (model, depth): the first picks the lr, the others repeat the chosen lr (mean and spread)
    'study_lrs': [3e-4, 1e-3, 3e-3],  # lr grid picked on val with the first seed, same for both models; [] = just lr. Half-decades around Adam's usual 1e-3
}
ROLE = dict.fromkeys(('study_width', 'study_epochs', 'study_init', 'study_dropout', 'study_seeds', 'study_lrs'),
                    STUDY)  # config.ROLE: the rest
STUDY_KEYS = resume_may_change(config, ROLE)  # a resumed single run may change these


def study_config(config: dict) -> dict:
    """The settings every study cell shares (all but model and depth; a seeded study sets lr and seed
    per cell, and its grid, study.GRID_KEYS, is no cell's setting); exercise 2.1 reuses them."""
    shared = {k: v for k, v in config.items() if k not in GRID_KEYS}
    return {**shared, 'width': config['study_width'], 'epochs': config['study_epochs'],
            'init': config['study_init'], 'dropout': config['study_dropout'], 'resume': ''}


def build_model(config: dict, data: Data):
    """config['model'] at config['depth'] hidden layers of config['width']."""
    c, h, w = data.shape
    hidden = [config['width']] * config['depth']
    if config['model'] == 'plain':
        return MLP(c * h * w, hidden, data.num_classes, dropout=config['dropout'], init=config['init'])
    if config['model'] == 'residual':
        return SkipMLP(c * h * w, hidden, data.num_classes, block_size=config['block_size'],
                       dropout=config['dropout'], norm=config['norm'], init=config['init'])
    raise UserError(f"unknown model {config['model']!r}; choose plain or residual")


def main(config: dict, overrides: dict) -> None:
    if config['part'] not in ('single', 'study', 'grads', 'all'):
        raise UserError(f"unknown part {config['part']!r}; choose single, study, grads or all")
    check_grid(config['study_seeds'], config['study_lrs'])  # before the single run trains
    if config['part'] in ('single', 'all'):
        train_run(EXERCISE, config, build_model, overrides, name=f"{config['model']}-d{config['depth']}-w{config['width']}",
                  may_change=STUDY_KEYS)

    # the study and the gradient analysis: every cell shares everything but model and depth
    study = study_config(config)
    subset = f" (subset {config['subset']})" if config['subset'] else ''
    run_parts(EXERCISE, config, study, build_model,
              title=f"{config['dataset']}{subset}, width {study['width']}, {plural(study['epochs'], 'epoch')}, "
                    f"init {study['init']}, dropout {study['dropout']}")

if __name__ == '__main__':
    cli(main, config, choices={'dataset': dataset_names(channels=1), 'part': ('single', 'study', 'grads', 'all'),
                               'model': ('plain', 'residual'), 'init': INITS, 'study_init': INITS})
