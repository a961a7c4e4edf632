"""Exercise 2.3: the Imagenette loader, the restricted ImageNet head, and smoke runs of both parts
(our CNN from a tiny synthetic-CIFAR checkpoint; ResNet-18 with random weights on a synthetic
Imagenette folder of real JPEGs), offline behaviour included. CPU, no network, seconds."""
import json
import os

import numpy as np
import pytest
import torch

import exercise_2_3 as ex23
from config import UserError, cli, parse_args
from explain import BETTER
from dataset import IMAGENETTE_WNIDS, load_imagenette
from models import IMAGENETTE_TO_IMAGENET, restrict_head
from synthetic import write_cifar10

MAPS = {'cam', 'grad_cam', 'grad_cam_pp', 'random', 'random_smooth', 'constant', 'object_prior'}  # every table's rows
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
TINY = ['--wandb', 'off', '--device', 'cpu', '--faithfulness_images', '12', '--faithfulness_steps', '4',
        '--sanity_images', '12', '--per_class', '[1,1]', '--batch_size', '16',
        '--sensitivity', 'False']  # part 1's smoke test turns it on


def write_imagenette(root, per_class: int = 2, size=(72, 88)) -> str:
    """<root>/imagenette2-160/val/<wnid>/*.JPEG, real JPEG files: class k is a bright square at a
    class-dependent place on a noisy background, in a non-square frame (so resize + crop matter)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(IMAGENETTE_WNIDS):
        folder = os.path.join(root, 'imagenette2-160', 'val', wnid)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
            r, c = 8 + 5 * (k // 5), 8 + 12 * (k % 5)
            img[r:r + 20, c:c + 20] = (255, 40 * k % 256, 200)
            Image.fromarray(img).save(os.path.join(folder, f'ILSVRC2012_val_{k:03d}{i:02d}.JPEG'), 'JPEG')
    return str(root)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A CNN trained for two steps by exercise 1.3 on synthetic CIFAR-10 pickles in the real format."""
    from exercise_1_3 import config, main
    root = tmp_path_factory.mktemp('ex23')
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', 80), ('test', 40))}
    write_cifar10(str(root / 'data'), arrays, CIFAR_CLASSES)
    cli(main, config, ['--data_dir', str(root / 'data'), '--runs_dir', str(root / 'runs'), '--run_name', 'tiny',
                       '--widths', '[8,16,32]', '--max_steps', '2', '--subset', '64', '--epochs', '1',
                       '--batch_size', '32', '--wandb', 'off', '--device', 'cpu'])
    return {'path': str(root / 'runs' / 'exercise_1_3' / 'tiny' / 'checkpoints' / 'best.pt'),
            'data_dir': str(root / 'data')}


@pytest.fixture(scope='module')
def imagenette_dir(tmp_path_factory):
    return write_imagenette(tmp_path_factory.mktemp('imagenette'))


def results_of(runs_dir, name):
    run_dir = os.path.join(runs_dir, 'exercise_2_3', name)
    with open(os.path.join(run_dir, 'results.json')) as f:
        return run_dir, json.load(f)


# ---------------------------------------------------------------------------------------------
# Imagenette loader and the ImageNet head

def test_imagenette_loader_reuses_the_folder_without_downloading(imagenette_dir, monkeypatch):
    import torchvision.datasets.imagenette as tv_imagenette

    def no_network(*args, **kwargs):
        raise AssertionError('downloaded although the folder exists')
    monkeypatch.setattr(tv_imagenette, 'download_and_extract_archive', no_network)
    x, y, classes = load_imagenette(imagenette_dir, image_size=48, download=True)
    assert x.shape == (20, 3, 48, 48) and x.dtype == torch.uint8
    assert y.tolist() == [k for k in range(10) for _ in range(2)]
    assert classes[:3] == ['tench', 'English springer', 'cassette player']
    x5, y5, _ = load_imagenette(imagenette_dir, image_size=48, limit=10)  # spread: one image per class
    assert sorted(y5.tolist()) == list(range(10))


def test_imagenette_missing_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets.imagenette as tv_imagenette

    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(tv_imagenette, 'download_and_extract_archive', offline)
    for download in (True, False):
        with pytest.raises(UserError) as e:
            load_imagenette(str(tmp_path), download=download)
        message = str(e.value)
        assert '\n' not in message and 'imagenette2-160.tgz' in message
        assert os.path.join(str(tmp_path), 'imagenette2-160') in message


def test_restricted_head_is_the_real_imagenet_head():
    from torchvision.models import ResNet18_Weights, resnet18
    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)                                                          # (2, 1000)
        ten = restrict_head(model, IMAGENETTE_TO_IMAGENET)(x)                    # (2, 10)
    torch.testing.assert_close(ten, full[:, IMAGENETTE_TO_IMAGENET])
    # the mapping names the same classes as Imagenette's sorted wnids (metadata only, no download)
    categories = ResNet18_Weights.IMAGENET1K_V1.meta['categories']
    assert [categories[i] for i in IMAGENETTE_TO_IMAGENET] == [
        'tench', 'English springer', 'cassette player', 'chain saw', 'church', 'French horn',
        'garbage truck', 'gas pump', 'golf ball', 'parachute']


# ---------------------------------------------------------------------------------------------
# Part 1: our CNN

def test_checkpoint_choice_prefers_the_dataset_then_finished_runs(tmp_path):
    def fake_run(name, dataset, finished, mtime):
        run_dir = tmp_path / 'exercise_1_3' / name
        (run_dir / 'checkpoints').mkdir(parents=True)
        (run_dir / 'config.json').write_text(json.dumps({'dataset': dataset}))
        if finished:
            (run_dir / 'results.json').write_text('{}')
        best = run_dir / 'checkpoints' / 'best.pt'
        best.write_bytes(b'')
        os.utime(best, (mtime, mtime))
        return str(best)
    cifar = fake_run('old-cifar', 'cifar10', True, 1000)
    fmnist = fake_run('new-fmnist', 'fashion_mnist', True, 2000)
    fake_run('running-fmnist', 'fashion_mnist', False, 3000)
    config = {**ex23.config, 'runs_dir': str(tmp_path)}
    assert ex23.find_checkpoint(config, {}) == cifar                       # the default prefers cifar10
    assert ex23.find_checkpoint({**config, 'dataset': 'fashion_mnist'}, {}) == fmnist  # finished first
    assert ex23.find_checkpoint({**config, 'dataset': 'mnist'}, {}) == fmnist           # else the newest finished


def test_part1_smoke_writes_figures_and_faithfulness(tiny_checkpoint, tmp_path, capsys):
    runs = str(tmp_path / 'runs')
    cli(ex23.main, ex23.config, ['--checkpoint', tiny_checkpoint['path'], '--part', 'cnn',
                                 '--assets_dir', str(tmp_path / 'assets'), '--runs_dir', runs, '--run_name', 'p1',
                                 *TINY, '--sensitivity', 'True', '--faithfulness_steps', '32'])
    run_dir, results = results_of(runs, 'p1')
    assert os.path.getsize(os.path.join(run_dir, 'results.json')) <= 64 * 1024  # fits a record (test_records.py)
    assert results['cnn_setup']['dataset'] == 'cifar10' and results['cnn_setup']['images'] == 12
    assert results['cnn_setup']['substrate'] == 'rise' and results['cnn_sensitivity']['substrate'] == 'black'
    assert results['cnn_setup']['map_size'] == [4, 4]
    assert set(results['cnn']) == MAPS
    for method in ('cam', 'grad_cam', 'grad_cam_pp'):
        row = results['cnn'][method]
        for baseline in ('random', 'random_smooth', 'constant'):
            assert set(row[f'beats_{baseline}']) == set(BETTER)
            assert all(isinstance(v, bool) for v in row[f'beats_{baseline}'].values())
        assert 0 <= row['deletion_auc'] <= 1 and 0 <= row['average_drop'] <= 100
    assert 'beats_random' not in results['cnn']['random']
    # the controls of issue 23: paired, Holm-corrected comparisons and the cascading randomisation
    for comparisons in (results['cnn_comparisons'], results['cnn_sensitivity']['comparisons']):
        assert comparisons['size'] == 24 and 'Holm' in comparisons['family']
        assert set(comparisons['pairs']['grad_cam_pp_vs_object_prior']) == set(BETTER)
        for metrics in comparisons['pairs'].values():
            assert all({'diff', 'lo', 'hi', 'p', 'p_holm', 'verdict'} <= set(r) and r['p'] <= r['p_holm'] <= 1
                       for r in metrics.values())
    sanity = results['cnn_sanity']
    assert list(sanity['cascade'])[0] == 'classifier' and list(sanity['cascade'])[-1] == 'stage1.conv'
    assert all(-1 <= sanity['cascade'][step][m]['lo'] <= sanity['cascade'][step][m]['hi'] <= 1
               for step in sanity['cascade'] for m in ('cam', 'grad_cam', 'grad_cam_pp'))
    assert set(sanity['faithfulness']['table']) >= {'cam_randomised', 'grad_cam_pp', 'random'}
    assert sanity['faithfulness']['comparisons']['size'] == 24 and sanity['images'] == 12
    for name in ('cnn_sanity_maps', 'cnn_sanity_rank_correlation'):
        assert os.path.exists(os.path.join(run_dir, f'{name}.png'))
    assert sanity['data_randomisation'] is None                        # --random_labels_epochs 0: skipped
    assert os.path.exists(os.path.join(run_dir, 'cnn_faithfulness.png'))
    assert any(os.path.exists(os.path.join(run_dir, f'cnn_{k}.png')) for k in ('correct', 'wrong'))
    assert not (tmp_path / 'assets').exists()                          # by default the README's figures stay
    printed = capsys.readouterr().out
    assert 'faithfulness' in printed and 'random' in printed and 'part 1 (our CNN) done' in printed
    assert 'data randomisation' not in printed


def test_part1_smoke_with_data_randomisation(tiny_checkpoint, tmp_path, capsys):
    runs = str(tmp_path / 'runs')
    cli(ex23.main, ex23.config, ['--checkpoint', tiny_checkpoint['path'], '--part', 'cnn', '--runs_dir', runs,
                                 '--run_name', 'dr', *TINY, '--random_labels_epochs', '2',
                                 '--random_labels_subset', '48'])  # seconds: 2 steps an epoch
    run_dir, results = results_of(runs, 'dr')
    assert os.path.getsize(os.path.join(run_dir, 'results.json')) <= 64 * 1024
    check_data_randomisation(results['cnn_sanity']['data_randomisation'], runs)
    assert os.path.exists(os.path.join(run_dir, 'cnn_sanity_maps.png'))
    printed = capsys.readouterr().out.split('data randomisation (Adebayo et al. 2018)')[1].splitlines()
    assert [line.split()[0] for line in printed[1:5]] == ['CAM', 'Grad-CAM', 'Grad-CAM++', 'model']
    assert 'rho' in printed[1] and 'memorised' in printed[4] and 'chance 10%' in printed[4]


def check_data_randomisation(record: dict, runs: str) -> None:
    """Every key of cnn_sanity.data_randomisation, and a permuted-label run folder that says so itself."""
    assert set(record) >= {'rank_correlation', 'faithfulness', 'model', 'explained_class', 'similarity', 'images'}
    assert set(record['rank_correlation']) == {'cam', 'grad_cam', 'grad_cam_pp'}
    assert all(set(r) == {'rho', 'lo', 'hi', 'flat_maps'} and -1 <= r['lo'] <= r['hi'] <= 1
               for r in record['rank_correlation'].values())
    faith = record['faithfulness']
    assert set(faith['table']) == {'cam_permuted', 'grad_cam_permuted', 'grad_cam_pp_permuted'}
    assert faith['comparisons']['size'] == 24 and len(faith['comparisons']['verdicts']) == 6
    verdicts = faith['comparisons']['verdicts']['grad_cam_pp_permuted_vs_random'].split(', ')
    assert [v.split()[0] for v in verdicts] == ['deletion', 'insertion', 'avg_drop', 'increase']
    assert all(v.split()[1] in ('tie', 'better', 'worse') for v in verdicts)
    model = record['model']
    assert {'run_dir', 'epochs', 'subset', 'permutation_seed', 'train_acc_permuted', 'test_acc'} <= set(model)
    assert (model['epochs'], model['subset'], model['permutation_seed'], model['checkpoint']) == (2, 48, 1, 'last.pt')
    assert 0 <= model['train_acc_permuted'] <= 1 and 0 <= model['test_acc'] <= 1
    run_dir = model['run_dir']
    assert os.path.dirname(run_dir) == os.path.join(runs, 'exercise_2_3')          # never a 1.3 checkpoint
    assert os.path.basename(run_dir).startswith('random-labels-cifar10-')
    assert os.path.exists(os.path.join(run_dir, 'checkpoints', 'last.pt'))
    with open(os.path.join(run_dir, 'config.json')) as f:                          # its own files say so
        config = json.load(f)
    assert config['train_labels'].startswith('PERMUTED') and config['label_permutation_seed'] == 1
    with open(os.path.join(run_dir, 'results.json')) as f:
        assert 'training labels permuted (seed 1)' in json.load(f)['dataset']


def test_permuted_label_model_is_reused_and_retrained_when_a_setting_changes(tiny_checkpoint, tmp_path, capsys):
    from checkpoint import load
    from exercise_1_3 import build_model
    from sanity import permuted_label_model
    trained = load(tiny_checkpoint['path']).config
    config = {**ex23.config, 'runs_dir': str(tmp_path / 'runs'), 'wandb': 'off', 'device': 'cpu',
              'random_labels_epochs': 1, 'random_labels_subset': 48}
    train = lambda **change: permuted_label_model(ex23.EXERCISE, trained, {**config, **change}, False, build_model,
                                                  torch.device('cpu'))[1]['run_dir']
    first = train()
    assert first == train() and 'skip' in capsys.readouterr().out                 # same settings: reused
    runs = {first, train(random_labels_seed=2), train(random_labels_epochs=2)}
    assert len(runs) == 3 and all(os.path.exists(os.path.join(r, 'results.json')) for r in runs)
    assert len(os.listdir(tmp_path / 'runs' / 'exercise_2_3')) == 3


def test_part1_trains_exercise_1_3_when_there_is_no_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import exercise_1_3
    monkeypatch.setitem(exercise_1_3.config, 'widths', [8, 16, 32])  # a tiny "default"
    runs = str(tmp_path / 'runs')
    cli(ex23.main, ex23.config, ['--part', 'cnn', '--data_dir', tiny_checkpoint['data_dir'], '--runs_dir', runs,
                                 '--max_steps', '1', '--subset', '32', '--epochs', '1', '--run_name', 'auto',
                                 '--assets', 'True', '--assets_dir', str(tmp_path / 'assets'), *TINY])
    assert 'no exercise 1.3 checkpoint' in capsys.readouterr().out
    trained = [d for d in os.listdir(os.path.join(runs, 'exercise_1_3'))]
    assert len(trained) == 1 and trained[0].startswith('residual-cnn-d1-cifar10')
    with open(os.path.join(runs, 'exercise_1_3', trained[0], 'results.json')) as f:
        assert json.load(f)['epochs_run'] == 1                              # the smoke overrides were passed on
    _, results = results_of(runs, 'auto')
    assert results['cnn_setup']['checkpoint'].startswith(os.path.join(runs, 'exercise_1_3', trained[0]))
    assert (tmp_path / 'assets' / 'ex23_cnn_faithfulness.png').exists()   # assets go where pointed


# ---------------------------------------------------------------------------------------------
# Part 2: ResNet-18 on Imagenette

PART2 = ['--part', 'resnet', '--weights', 'random', '--image_size', '64', '--resnet_faithfulness_images', '8',
         '--min_map_size', '2']  # 64 px: 2x2 maps at layer4, enough for a smoke run


def test_part2_smoke_random_weights(imagenette_dir, tmp_path):
    runs = str(tmp_path / 'runs')
    cli(ex23.main, ex23.config, [*PART2, '--data_dir', imagenette_dir, '--runs_dir', runs, '--run_name', 'p2',
                                 '--assets', 'True', '--assets_dir', str(tmp_path / 'assets'), '--imagenette_limit', '4', *TINY])
    run_dir, results = results_of(runs, 'p2')
    assert results['resnet18_weights'] == 'random' and results['resnet18_setup']['weights'] == 'random weights'
    assert results['resnet18_setup']['val_images'] == 4 and 0 <= results['resnet18_imagenette_val_acc'] <= 1
    assert set(results['resnet18']) == MAPS
    assert os.path.exists(os.path.join(run_dir, 'resnet18_faithfulness.png'))
    assert any(os.path.exists(os.path.join(run_dir, f'resnet18_{k}.png')) for k in ('correct', 'wrong'))
    assert not (tmp_path / 'assets').exists()                  # random-weight maps never reach assets/
    assert 'random weights' in results['summary'] and 'not held out' in results['summary']
    assert results['resnet18_held_out'] is False and 'ImageNet training images' in results['resnet18_not_held_out']


def test_zero_shot_accuracy_goes_through_the_imagenette_mapping(imagenette_dir, tmp_path, monkeypatch):
    from torchvision.models import resnet18

    def springer_everywhere(weights):  # ImageNet class 217 = English springer = Imagenette label 1
        model = resnet18(weights=None)
        with torch.no_grad():
            model.fc.bias[217] = 1e4
        return model
    monkeypatch.setattr(ex23, 'build_resnet18', springer_everywhere)
    runs = str(tmp_path / 'runs')
    cli(ex23.main, ex23.config, [*PART2, '--data_dir', imagenette_dir, '--runs_dir', runs, '--run_name', 'map',
                                 '--assets', 'false', *TINY, '--per_class', '[0,0]', '--faithfulness_steps', '2',
                                 '--resnet_faithfulness_images', '2'])
    _, results = results_of(runs, 'map')
    assert results['resnet18_imagenette_val_acc'] == pytest.approx(0.1)    # 2 of the 20 images are label 1
    per_class = results['resnet18_per_class_acc']
    assert per_class['English springer'] == 1 and sum(per_class.values()) == 1


def test_offline_part2_is_skipped_and_part1_completes(tiny_checkpoint, tmp_path, run_script):
    """No weights in TORCH_HOME, no Imagenette, and every download refused by a dead proxy."""
    dead = 'http://127.0.0.1:9'
    env = {'TORCH_HOME': str(tmp_path / 'torch_home'), 'https_proxy': dead, 'http_proxy': dead,
           'HTTPS_PROXY': dead, 'HTTP_PROXY': dead, 'no_proxy': '', 'NO_PROXY': '', 'OMP_NUM_THREADS': '1'}
    runs = str(tmp_path / 'runs')
    data_dir = tiny_checkpoint['data_dir']
    p = run_script('exercise_2_3.py', '--checkpoint', tiny_checkpoint['path'], '--data_dir', data_dir,
                   '--runs_dir', runs, '--run_name', 'offline', '--assets', 'false', *TINY, '--per_class', '[1,0]',
                   '--faithfulness_images', '4', env=env)
    assert p.returncode == 0, p.stderr
    assert 'Traceback' not in p.stdout + p.stderr
    assert 'resnet18-f37072fd.pth' in p.stdout and os.path.join(str(tmp_path / 'torch_home'), 'hub') in p.stdout
    assert 'imagenette2-160.tgz' in p.stdout and os.path.join(data_dir, 'imagenette2-160') in p.stdout
    _, results = results_of(runs, 'offline')
    assert results['resnet18'] is None and 'skipped' in results['resnet18_skipped']
    assert set(results['cnn']) == MAPS
    assert 'part 1 (our CNN) done' in results['summary'] and 'part 2 skipped' in results['summary']


@pytest.mark.parametrize('argv, words', [
    (['--random_labels_epochs', '-1'], '--random_labels_epochs must be >= 0'),
    (['--random_labels_subset', '-5'], '--random_labels_subset must be >= 0'),
    (['--random_labels_epochs', '2', '--sanity_images', '0'], 'needs --sanity_images > 0'),
])
def test_data_randomisation_settings_that_cannot_run_are_refused(tmp_path, argv, words):
    """Before any checkpoint is loaded or trained: a negative count would silently skip (or, as a
    subset, drop the last images); data randomisation without sanity images would silently do nothing."""
    with pytest.raises(UserError) as e:
        ex23.main({**ex23.config, "runs_dir": str(tmp_path), **parse_args(ex23.config, argv)}, {})
    assert words in str(e.value) and '\n' not in str(e.value) and not os.listdir(tmp_path)
