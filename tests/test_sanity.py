"""The controls of exercise 2.3 (sanity.py, explain.object_prior): the cascade re-initialises exactly
the layers it names, the object prior is a function of the image alone, paired families call a map
compared with itself a tie, Holm's correction matches a hand computation. CPU, tiny models, seconds."""
import pytest
import torch
from scipy.stats import spearmanr

import explain as E
import sanity as S
from models import CNN

MEAN, STD = torch.tensor([0.1307]), torch.tensor([0.3081])  # MNIST's


def tiny_cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    model = CNN(1, 10, [4, 8, 8], depth=1)
    with torch.no_grad():  # trained-looking parameters and BatchNorm statistics, so a reset is visible
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if 'running' in name:
                buf.uniform_(0.5, 1.5)
    return model.eval()


def digits(n: int = 8) -> torch.Tensor:
    """Normalised 28x28 'ink on black' images."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    for k in range(n):
        r, c = torch.randint(2, 14, (2,), generator=g).tolist()
        x[k, 0, r:r + 12, c:c + 6] = torch.rand(12, 6, generator=g)
    return (x - MEAN) / STD


def test_cascade_changes_exactly_the_layers_it_names():
    """Head first; at every step each parameter of a randomised group differs from the trained one and
    every other parameter and buffer is bit-identical; the trained model itself is untouched."""
    model, x = tiny_cnn(), digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = list(S.cascade(model, x, seed=0, batch=4))
    assert [s for s, _, _ in steps] == ['classifier', 'stage3.block1', 'stage3.conv', 'stage2.block1', 'stage2.conv',
                                        'stage1.block1', 'stage1.conv']
    for step, randomised, names in steps:
        inside = lambda key: any(key == n or key.startswith(n + '.') for n in names)
        trained, now = model.state_dict(), randomised.state_dict()
        for key, value in now.items():
            if not inside(key):
                assert torch.equal(value, trained[key]), (step, key)                 # bit-identical
            elif not key.endswith('num_batches_tracked'):
                assert not torch.equal(value, trained[key]), (step, key)             # really re-initialised
        assert any(inside(k) for k in now)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the same seed draws the same weights
    again = list(S.cascade(model, x, seed=0, batch=4))
    last, last_again = steps[-1][1].state_dict(), again[-1][1].state_dict()
    assert all(torch.equal(v, last_again[k]) for k, v in last.items())


def test_randomise_touches_no_global_rng():
    model = tiny_cnn()
    torch.manual_seed(5)
    S.randomise(model, ['classifier'], seed=1)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))


def test_object_prior_is_the_image_alone():
    """Same images, two different models: the same map, and no model is ever called to make it; it is
    the pixel intensity pooled to the maps' cells and post-processed like the maps."""
    x = digits()
    a, b = tiny_cnn(0), tiny_cnn(1)
    hw_a, hw_b = E.map_size(a, x, a.features, a.classifier), E.map_size(b, x, b.features, b.classifier)
    assert hw_a == hw_b == (3, 3)
    calls = []
    for model in (a, b):
        model.register_forward_pre_hook(lambda *args: calls.append(1))
    prior_a, prior_b = E.object_prior(x, MEAN, STD, hw_a), E.object_prior(x, MEAN, STD, hw_b)
    assert torch.equal(prior_a, prior_b) and calls == []
    pixels = (x * STD + MEAN).mean(1, keepdim=True)
    expected = E._finish(torch.nn.functional.adaptive_avg_pool2d(pixels, (3, 3))[:, 0], (28, 28), True)
    torch.testing.assert_close(prior_a, expected)
    assert prior_a.shape == (8, 28, 28) and prior_a.min() >= 0 and prior_a.max() <= 1
    ink = pixels[:, 0] > 0
    assert prior_a[ink].mean() > prior_a[~ink].mean()                   # it points at the ink
    table = E.faithfulness(a, x, a.features, a.classifier, MEAN, STD, 'black', steps=4, batch_size=4)['table']
    assert 'object_prior' in table and 'vs' not in table['object_prior']  # a baseline row of every table


def test_a_map_compared_with_itself_is_a_tie():
    g = torch.Generator().manual_seed(0)
    values = {'cam': {k: torch.rand(50, generator=g) for k in E.BETTER}}
    values['grad_cam'] = {k: v + 0.2 for k, v in values['cam'].items()}
    family = S.paired_family(values, [('cam', 'cam'), ('grad_cam', 'cam')], 'test family')
    assert family['size'] == 8 and family['family'] == 'test family'
    for r in family['pairs']['cam_vs_cam'].values():
        assert r['diff'] == 0 and r['lo'] == r['hi'] == 0 and r['p'] == 1 and r['p_holm'] == 1
        assert r['verdict'] == 'tie'
    shifted = family['pairs']['grad_cam_vs_cam']
    assert shifted['deletion_auc']['verdict'] == 'worse' and shifted['insertion_auc']['verdict'] == 'better'
    assert all(r['p'] < 0.01 for r in shifted.values())
    assert E.compare(values['cam']['deletion_auc'], values['cam']['deletion_auc'], 'lower', with_p=True)['p'] == 1
    assert 'p' not in E.compare(values['cam']['deletion_auc'], values['cam']['deletion_auc'], 'lower')


def test_method_comparisons_cover_every_pair_and_the_object_prior():
    g = torch.Generator().manual_seed(0)
    values = {m: {k: torch.rand(20, generator=g) for k in E.BETTER} for m in (*E.METHODS, 'object_prior')}
    family = S.method_comparisons(values)
    assert family['size'] == 24 and len(family['pairs']) == 6 and 'cam_vs_object_prior' in family['pairs']


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.06 for the last
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])                # capped at 1
    assert S.holm([0.02]) == [0.02] and S.holm([]) == []


def test_spearman_per_image_matches_scipy_and_flat_maps_are_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 6, 6, generator=g)
    b = (a + 0.5 * torch.rand(4, 6, 6, generator=g)).round(decimals=1)  # with ties
    rho = S.spearman(a, b)
    for i in range(4):
        assert rho[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic)
    assert S.spearman(a, a).tolist() == pytest.approx([1.0] * 4)
    assert S.spearman(a, -a).tolist() == pytest.approx([-1.0] * 4)
    assert S.spearman(a, torch.zeros_like(a)).tolist() == [0.0] * 4


def test_sanity_checks_record_shape():
    model, x = tiny_cnn(), digits(6)
    record, figure = S.sanity_checks(model, x, MEAN, STD, 'black', steps=2, batch_size=3, seed=0, shown=2)
    assert list(record['cascade']) == [s for s, _ in S.cascade_groups(model)]
    row = record['cascade']['classifier']['cam']
    assert set(row) == {'rho', 'lo', 'hi', 'flat_maps'} and row['lo'] <= row['rho'] <= row['hi']
    assert set(figure) == {'trained', *record['cascade']} and figure['trained']['cam'].shape == (2, 28, 28)
    assert record['faithfulness']['comparisons']['size'] == 24


# ----------------------------------------------------------------------------- data randomisation

def toy_data(n: int = 60):
    from dataset import Data, Split
    g = torch.Generator().manual_seed(0)
    split = lambda k: Split(x=torch.randint(0, 256, (k, 1, 28, 28), dtype=torch.uint8, generator=g),
                            y=torch.arange(k) % 10, mean=MEAN.view(1, 1, 1, 1), std=STD.view(1, 1, 1, 1))
    return Data('mnist', split(n), split(20), split(20), [str(d) for d in range(10)])


def test_permuting_labels_is_a_permutation_of_the_training_labels_only():
    data = toy_data()
    a, b, c = S.permute_labels(data, 1), S.permute_labels(data, 1), S.permute_labels(data, 2)
    assert torch.equal(a.train.y, b.train.y) and not torch.equal(a.train.y, c.train.y)   # deterministic per seed
    assert torch.equal(a.train.y.bincount(), data.train.y.bincount())                  # same class histogram
    assert (a.train.y != data.train.y).float().mean() > 0.5                            # labels actually moved
    assert torch.equal(a.train.x, data.train.x)                                        # images stay where they are
    for name in ('val', 'test'):                                                       # true labels untouched
        assert torch.equal(getattr(a, name).y, getattr(data, name).y)
        assert torch.equal(getattr(a, name).x, getattr(data, name).x)
    assert torch.equal(data.train.y, torch.arange(60) % 10)                            # the input is not changed
    assert 'permuted' in a.name and 'seed 1' in a.name and data.name == 'mnist'


def test_data_randomisation_of_a_model_against_itself_is_identity():
    """The same model as its own 'permuted-label' copy: rho 1 for every method whose maps are not flat,
    and every comparison of its maps with the trained maps a tie (diff 0, p 1)."""
    def fresh_cnn(seed: int) -> CNN:  # PyTorch's init: no flat maps on these images (tiny_cnn's are all flat)
        torch.manual_seed(seed)
        return CNN(1, 10, [4, 8, 8], depth=1).eval()
    model, x = fresh_cnn(0), digits(8)
    record, figure = S.data_randomisation(model, model, x, MEAN, STD, 'black', steps=2, batch_size=3, seed=0, shown=2)
    assert set(record['rank_correlation']) == set(E.METHODS) and figure['cam'].shape == (2, 28, 28)
    for m, row in record['rank_correlation'].items():
        assert row == {'rho': 1.0, 'lo': 1.0, 'hi': 1.0, 'flat_maps': 0.0}, m
    faith = record['faithfulness']
    assert faith['comparisons']['size'] == 24 and 'permuted-label' in faith['comparisons']['family']
    assert set(faith['table']) == {f'{m}_permuted' for m in E.METHODS}  # the others: the cascade's table
    cascade, _ = S.sanity_checks(model, x, MEAN, STD, 'black', steps=2, batch_size=3, seed=0)
    for m in E.METHODS:
        assert faith['table'][f'{m}_permuted'] == cascade['faithfulness']['table'][m]   # scored as the trained maps
        assert faith['comparisons']['verdicts'][f'{m}_permuted_vs_{m}'] == ', '.join(f'{S.SHORT[k]} tie (+0)' for k in E.BETTER)
        assert f'{m}_permuted_vs_random' in faith['comparisons']['verdicts']
    other, _ = S.data_randomisation(model, fresh_cnn(1), x, MEAN, STD, 'black', steps=2, batch_size=3, seed=0)
    assert any(r['rho'] < 0.99 for r in other['rank_correlation'].values())  # another model's maps differ


def test_permuted_label_config_names_every_setting_that_shapes_it():
    import exercise_2_3 as ex23
    trained = {'dataset': 'mnist', 'data_dir': '/elsewhere', 'epochs': 15, 'subset': 0, 'seed': 3, 'augment': True,
               'lr': 0.1, 'run_name': 'r', 'resume': '', 'runs_dir': '/old', 'wandb': 'online', 'device': 'cuda'}
    config = {**ex23.config, 'random_labels_epochs': 4, 'runs_dir': '/new', 'wandb': 'off', 'device': 'cpu'}
    cfg, name = S.permuted_label_config(trained, config, data_dir_given=False)
    assert name.startswith('random-labels-mnist-') and cfg['data_dir'] == '/elsewhere'
    assert (cfg['epochs'], cfg['subset'], cfg['seed'], cfg['augment']) == (4, 5000, 0, False)
    assert (cfg['runs_dir'], cfg['wandb'], cfg['device'], cfg['lr']) == ('/new', 'off', 'cpu', 0.1)
    assert cfg['label_permutation_seed'] == 1 and cfg['train_labels'].startswith('PERMUTED')
    changed = [{'random_labels_seed': 2}, {'random_labels_epochs': 5}, {'random_labels_subset': 100}, {'seed': 1}]
    names = {S.permuted_label_config(trained, {**config, **c}, False)[1] for c in changed}
    assert len(names) == len(changed) and name not in names
    assert S.permuted_label_config({**trained, 'lr': 0.2}, config, False)[1] != name       # the recipe
    same = {**config, 'runs_dir': '/other', 'wandb': 'offline', 'device': 'auto', 'data_dir': '/x'}
    assert S.permuted_label_config(trained, same, True)[1] == name                         # where it runs: no
