"""Controls for exercise 2.3's maps: Adebayo et al. (2018)'s cascading model-parameter randomisation
(re-initialise a models.CNN from the head down; rank-correlate each method's maps with the trained
model's; score the fully randomised model's maps for faithfulness on the trained model), their data
randomisation (the same comparisons for a copy trained on permuted training labels: its labels and
config) and paired comparisons between maps, Holm-corrected over a stated family.
Why each choice: docs/exercise_2_3.md.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from typing import Iterator

import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from config import RUNS, identity, keys_with
from dataset import Data, load_data
from evaluate import evaluate, load_model
from explain import BETTER, METHODS, bootstrap_ci, compare, explain_all, map_scores, predict, substrate_fns
from models import CNN
from training import BuildModel, cached_run, digest

LEVEL = 0.05  # family-wise error rate of every Holm-corrected family
SHORT = {'deletion_auc': 'deletion', 'insertion_auc': 'insertion', 'average_drop': 'avg_drop',
         'increase_in_confidence': 'increase'}  # the data randomisation's verdicts: results.json is nearly full
SIMILARITY = ('Spearman rank correlation per image of the upsampled maps (ties at average rank; a flat map '
              'correlates 0), mean and 95% bootstrap interval over images')
BATCHNORM = ('randomised groups: weight 1, bias 0, running statistics re-estimated on the explained images (stale '
             'ones would mis-scale the random layers); every other BatchNorm keeps its trained statistics')


# ----------------------------------------------------------------------------- paired families

def significant(obj, digits: int = 4):
    """obj with every float rounded to `digits` significant digits (dicts and lists walked): these
    records are read by people and must fit a 64 KB record (tests/test_records.py)."""
    if isinstance(obj, float):
        return float(f'{obj:.{digits}g}')
    if isinstance(obj, dict):
        return {k: significant(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [significant(v, digits) for v in obj]
    return obj


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest of m is multiplied by
    m - k + 1 (k from 1), capped at 1 and made non-decreasing along that order."""
    order = sorted(range(len(p)), key=p.__getitem__)
    adjusted, running = [1.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adjusted[i] = running
    return adjusted


def paired_family(values: dict[str, dict[str, Tensor | list[float]]], pairs: list[tuple[str, str]], family: str,
                  seed: int = 0) -> dict:
    """Map a vs map b, image by image (explain.compare), on every metric of BETTER for every pair,
    Holm-corrected over all of them (the family, described in words by `family`). values: {map:
    {metric: (N,) tensor or list}}. Returns {'family', 'size', 'level', 'correction', 'pairs': {'<a>_vs_<b>': {metric:
    {diff, lo, hi, p, p_holm, verdict}}}}; verdict is a's: 'better' / 'worse' when p_holm < LEVEL, else 'tie'."""
    v = {m: {k: torch.as_tensor(x) for k, x in row.items()} for m, row in values.items()}  # lists welcome
    raw = {(a, b, k): compare(v[a][k], v[b][k], better, seed, with_p=True) for a, b in pairs for k, better in BETTER.items()}
    adjusted = dict(zip(raw, holm([r['p'] for r in raw.values()])))
    out: dict = {}
    for (a, b, k), r in raw.items():
        good = r['diff'] < 0 if BETTER[k] == 'lower' else r['diff'] > 0
        verdict = ('better' if good else 'worse') if adjusted[a, b, k] < LEVEL else 'tie'
        out.setdefault(f'{a}_vs_{b}', {})[k] = {'diff': r['diff'], 'lo': r['ci95'][0], 'hi': r['ci95'][1],
                                                'p': r['p'], 'p_holm': adjusted[a, b, k], 'verdict': verdict}
    return {'family': family, 'size': len(raw), 'level': LEVEL, 'correction': 'Holm', 'pairs': significant(out)}


def method_comparisons(values: dict[str, dict[str, Tensor | list[float]]], seed: int = 0) -> dict:
    """Every pair of the methods and the object prior, on one faithfulness table's images and metrics."""
    maps = (*METHODS, 'object_prior')
    pairs = list(itertools.combinations(maps, 2))
    family = (f"every pair of {', '.join(maps)} on the {len(BETTER)} metrics of this table ({len(pairs)} pairs x "
              f"{len(BETTER)} = {len(pairs) * len(BETTER)} paired comparisons), Holm at {LEVEL}")
    return paired_family(values, pairs, family, seed)


# ----------------------------------------------------------------------------- randomisation

def cascade_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """A models.CNN's layer groups, head first: [(step, qualified module names)]: the classifier, then
    per stage from the last, each block (last first), then the stage's conv + BatchNorm."""
    groups = [('classifier', ['classifier'])]
    for s in reversed(range(len(model.features))):
        stage = model.features[s]
        stem = [f'features.{s}.{i}' for i, m in enumerate(stage) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        blocks = [i for i, m in enumerate(stage)
                  if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and any(True for _ in m.parameters())]
        groups += [(f'stage{s + 1}.block{j + 1}', [f'features.{s}.{i}']) for j, i in reversed(list(enumerate(blocks)))]
        groups.append((f'stage{s + 1}.conv', stem))
    return groups


def randomise(model: nn.Module, names: list[str], seed: int) -> nn.Module:
    """A copy of model whose named modules are re-initialised by their own reset_parameters (PyTorch's
    default init; BatchNorm: weight 1, bias 0, running stats reset), seeded on the CPU so a GPU draws
    the same weights; every other parameter and buffer is bit-identical to model's."""
    device = next(model.parameters()).device
    out = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        for name in names:
            for m in out.get_submodule(name).modules():
                if hasattr(m, 'reset_parameters'):
                    m.reset_parameters()
    return out.to(device).eval()


def refresh_batchnorm(model: nn.Module, names: list[str], images: Tensor, batch: int) -> None:
    """Re-estimate the running statistics of the BatchNorm layers inside the named modules (only
    those) on images (N, C, H, W): a cumulative average over batches, the rest of the model in eval mode."""
    norms = [m for n in names for m in model.get_submodule(n).modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
        bn.train()
    with torch.no_grad():
        for xb in images.split(batch):
            model(xb)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()


def cascade(model: nn.Module, images: Tensor, seed: int, batch: int) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(step, randomised copy, every module name randomised so far) per cascade step, head first:
    step k re-initialises group k (seed + k) of the previous step's model, then refreshes the
    BatchNorm statistics of every randomised group (their inputs changed)."""
    done: list[str] = []
    current = model
    for k, (step, names) in enumerate(cascade_groups(model)):
        current = randomise(current, names, seed + k)
        done = done + names
        refresh_batchnorm(current, done, images, batch)
        yield step, current, done


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Spearman rank correlation (B,) of maps a and b (B, H, W), ties at their average rank;
    0 where either map is flat (it ranks nothing)."""
    ra, rb = (torch.from_numpy(rankdata(m.detach().flatten(1).double().cpu().numpy(), axis=1)) for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    norm = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(norm > 0, (ra * rb).sum(1) / norm.clamp(min=1e-300), torch.zeros_like(norm))


def _rho(rho: Tensor, flat: Tensor, seed: int) -> dict:
    lo, hi = bootstrap_ci(rho, seed=seed)
    return significant({'rho': rho.mean().item(), 'lo': lo, 'hi': hi, 'flat_maps': flat.float().mean().item()})


def _scored(model: nn.Module, images: Tensor, maps: dict[str, Tensor], substrate: str, mean: Tensor, std: Tensor,
            steps: int, batch: int, seed: int) -> dict[str, dict[str, Tensor]]:
    """{map: {metric: (N,)}}: every map set scored on `model` (the trained one), one random tie-break."""
    removed, start = substrate_fns(substrate, mean, std)
    g = torch.Generator().manual_seed(seed)
    ties = torch.rand(images.shape[0], *images.shape[2:], generator=g).to(images.device)  # (N, H, W)
    rows: dict = {m: [] for m in maps}
    for i in range(0, len(images), batch):
        xb, tb = images[i:i + batch], ties[i:i + batch]
        for m, v in maps.items():
            per_image, _ = map_scores(model, xb, v[i:i + batch], removed, start, steps, tb)
            rows[m].append({k: s.cpu() for k, s in per_image.items()})
    return {m: {k: torch.cat([r[k] for r in rs]) for k in BETTER} for m, rs in rows.items()}


def sanity_checks(model: nn.Module, images: Tensor, mean: Tensor, std: Tensor, substrate: str, *, steps: int,
                  batch_size: int, seed: int, shown: int = 3) -> tuple[dict, dict]:
    """Cascading randomisation of a models.CNN on normalised images (N, C, H, W), every map of the
    trained model's predicted class. Returns (record, figure maps): record = {'cascade': {step: {method:
    {rho, lo, hi, flat_maps}}}, 'randomised_modules': {step: the names it re-initialised}, 'faithfulness':
    the trained and the fully randomised model's maps (and i.i.d. random) scored on the trained model:
    mean per metric, and a Holm family of paired comparisons (their intervals), ...}; figure maps =
    {'trained' | step: {method: the first `shown` maps}}."""
    _, classes = predict(model, images)
    trained = explain_all(model, images, model.features, model.classifier, batch_size, classes)
    record: dict = {'cascade': {}, 'randomised_modules': {}}
    done: list[str] = []
    figure = {'trained': {m: v[:shown].cpu() for m, v in trained.items()}}
    for step, randomised, names in cascade(model, images, seed, batch_size):
        maps = explain_all(randomised, images, randomised.features, randomised.classifier, batch_size, classes)
        record['cascade'][step] = {m: _rho(spearman(trained[m], maps[m]), maps[m].flatten(1).amax(1) == 0, seed)
                                   for m in METHODS}
        record['randomised_modules'][step] = names[len(done):]  # this step's group; the earlier ones stay random
        done = names
        figure[step] = {m: v[:shown].cpu() for m, v in maps.items()}
    record['faithfulness'] = _against_trained(model, images, trained, {f'{m}_randomised': maps[m] for m in METHODS},
                                              'fully randomised', mean, std, substrate, steps, batch_size, seed)
    record |= {'images': len(images), 'explained_class': "the trained model's prediction, at every step",
               'similarity': SIMILARITY, 'init': 'reset_parameters (PyTorch default), seed + step',
               'batchnorm': BATCHNORM}
    return record, figure


def _against_trained(model: nn.Module, images: Tensor, trained: dict[str, Tensor], other: dict[str, Tensor],
                     what: str, mean: Tensor, std: Tensor, substrate: str, steps: int, batch: int, seed: int) -> dict:
    """Every method's `other` maps ('<method>_<suffix>', `what` they are) vs its trained maps and vs i.i.d.
    random maps, all scored on the trained model: {table, comparisons (a Holm family), substrate, steps, scored_on}."""
    g = torch.Generator().manual_seed(seed)
    scored = {**trained, **other, 'random': torch.rand(len(images), *images.shape[2:], generator=g).to(images.device)}
    values = _scored(model, images, scored, substrate, mean, std, steps, batch, seed)
    pairs = [(name, ref) for name, m in zip(other, METHODS) for ref in (m, 'random')]
    family = (f"each method's {what} maps vs its trained maps and vs i.i.d. random maps, on the trained "
              f"model, {len(BETTER)} metrics ({len(pairs) * len(BETTER)} paired comparisons), Holm at {LEVEL}")
    return {'table': significant({m: {k: v.mean().item() for k, v in row.items()} for m, row in values.items()}),
            'comparisons': paired_family(values, pairs, family, seed), 'substrate': substrate, 'steps': steps,
            'scored_on': 'the trained model (its predicted class): do maps of a model that knows nothing still '
                         'pass the faithfulness test?'}


# ----------------------------------------------------------------------------- data randomisation

def permute_labels(data: Data, seed: int) -> Data:
    """data with its training labels shuffled among its training images (torch.randperm, seeded): the
    class histogram is unchanged, no label says anything about its image, so a model can only memorise.
    val and test keep their true labels; the name says what was done (results.json's 'dataset')."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).to(data.train.y.device)
    return dataclasses.replace(data, name=f"{data.name}, training labels permuted (seed {seed})",
                               train=dataclasses.replace(data.train, y=data.train.y[order]))


def permuted_label_config(trained: dict, config: dict, data_dir_given: bool) -> tuple[dict, str]:
    """The permuted-label model's config (the explained checkpoint's, `trained`: architecture, data, recipe;
    with 2.3's random_labels_* keys, seed, max_steps, where it runs; no augmentation: shifted copies slow
    memorising) saying its labels were permuted, and its run name with the digest of all that shapes it."""
    runs = {k: config[k] for k in keys_with(config, RUNS) if k != 'data_dir' or data_dir_given}
    seed = config['random_labels_seed']
    cfg = {**trained, **runs, 'epochs': config['random_labels_epochs'], 'subset': config['random_labels_subset'],
           'seed': config['seed'], 'max_steps': config['max_steps'], 'augment': False, 'label_permutation_seed': seed,
           'train_labels': f"PERMUTED: the training labels shuffled among the training images (torch.randperm, "
                           f"seed {seed}), so this model can only memorise them; val and test labels are true "
                           f"(exercise 2.3's data randomisation check)"}
    return cfg, f"random-labels-{trained['dataset']}-{digest(identity(cfg))}"


def permuted_label_model(exercise: str, trained: dict, config: dict, data_dir_given: bool, build_model: BuildModel,
                         device: torch.device) -> tuple[nn.Module, dict]:
    """The data randomisation's model via training.cached_run (runs/<exercise>/<name>, reused when done), and its
    record. Its LAST checkpoint: with true val labels, best-on-val would pick the least memorised epoch."""
    cfg, name = permuted_label_config(trained, config, data_dir_given)

    def make_data(c: dict, on: torch.device) -> Data:
        return permute_labels(load_data(c, on), c['label_permutation_seed'])
    with torch.random.fork_rng(devices=[]):  # training reseeds; the caller's RNG stream is left as it was
        run_dir, _ = cached_run(exercise, cfg, name, build_model, make_data=make_data, tags=['random-labels'])
    model, _ = load_model(os.path.join(run_dir, 'checkpoints', 'last.pt'), expect=(CNN,), what='a models.CNN')
    model.to(device).eval()
    return model, {'run_dir': run_dir, 'checkpoint': 'last.pt', 'epochs': cfg['epochs'], 'subset': cfg['subset'],
                   'permutation_seed': cfg['label_permutation_seed'], **memorisation(model, make_data(cfg, device))}


def memorisation(model: nn.Module, data: Data) -> dict:
    """Accuracy of a permuted-label model on its own (permuted) training labels, unaugmented, and on the
    true test labels: memorised if the first is high, nothing learned about the task if the second is chance."""
    train = dataclasses.replace(data.train, augment=None)
    return {'train_acc_permuted': evaluate(model, train)['acc'], 'test_acc': evaluate(model, data.test)['acc'],
            'chance': 1 / data.num_classes}


def data_randomisation(model: nn.Module, permuted_model: nn.Module, images: Tensor, mean: Tensor, std: Tensor,
                       substrate: str, *, steps: int, batch_size: int, seed: int, shown: int = 3) -> tuple[dict, dict]:
    """Adebayo et al.'s data randomisation on normalised images (N, C, H, W): each method's maps of
    permuted_model (the same architecture trained on permuted labels) vs the trained model's, both for
    the trained model's predicted class. Returns (record, figure maps): record = {'rank_correlation':
    {method: {rho, lo, hi, flat_maps}}, 'faithfulness': the permuted-label model's maps scored on the trained
    model (table: their rows; comparisons: the Holm family's verdict and difference per pair and metric), ...};
    figure maps = {method: the first `shown` maps of permuted_model}. Compact, in words where the cascade
    has numbers: exercise 2.3's results.json, cascade included, must stay under 64 KB."""
    _, classes = predict(model, images)
    trained = explain_all(model, images, model.features, model.classifier, batch_size, classes)
    maps = explain_all(permuted_model, images, permuted_model.features, permuted_model.classifier, batch_size, classes)
    faith = _against_trained(model, images, trained, {f'{m}_permuted': maps[m] for m in METHODS},
                             'permuted-label', mean, std, substrate, steps, batch_size, seed)
    family = faith['comparisons']
    faith |= {'table': {k: v for k, v in faith['table'].items() if k.endswith('_permuted')},
              'comparisons': {'family': f"each method's permuted-label maps vs its trained maps and vs i.i.d. random "
                                        f"maps, {len(BETTER)} metrics x {len(family['pairs'])} pairs, Holm at {LEVEL}",
                              **{k: family[k] for k in ('size', 'level', 'correction')},
                              'verdicts': {pair: ', '.join(f"{SHORT[k]} {r['verdict']} ({r['diff']:+.2g})"
                                                           for k, r in row.items())
                                           for pair, row in family['pairs'].items()}},
              'scored_on': "the trained model; trained and random rows: cnn_sanity.faithfulness"}
    record = {'rank_correlation': {m: _rho(spearman(trained[m], maps[m]), maps[m].flatten(1).amax(1) == 0, seed)
                                   for m in METHODS},
              'faithfulness': faith, 'images': len(images),
              'explained_class': "the trained model's prediction", 'similarity': "as the cascade's"}
    return record, {m: v[:shown].cpu() for m, v in maps.items()}
