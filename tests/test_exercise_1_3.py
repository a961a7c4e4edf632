"""Exercise 1.3: CIFAR-10 pickles, on-device augmentation, the plain/residual CNN, and smoke runs
of the default, the study and the 1-channel (Fashion-MNIST) path. CPU, offline, seconds."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from config import UserError, cli
from conftest import write_mnist
from dataset import load_cifar10, load_data, random_crop, random_flip
from synthetic import write_cifar10
from evaluate import load_model
from models import CNN, num_params

CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def synthetic_cifar(root, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', n_train), ('test', n_test))}
    write_cifar10(str(root), arrays, CLASSES)
    return arrays


# ---------------------------------------------------------------------------------------------
# CIFAR-10 files

def test_cifar_files_are_in_the_real_format(tmp_path):
    """Our writer produces what the CIFAR page and torchvision's reader expect."""
    arrays = synthetic_cifar(tmp_path)
    folder = tmp_path / 'cifar-10-batches-py'
    with open(folder / 'data_batch_1', 'rb') as f:  # as the CIFAR-10 page loads it
        batch = pickle.load(f, encoding='bytes')
    assert batch[b'data'].shape == (12, 3072) and batch[b'data'].dtype == np.uint8
    assert batch[b'labels'] == arrays['train'][1][:12].tolist()
    assert (folder / 'data_batch_1').read_bytes()[:2] == b'\x80\x02'  # pickle protocol 2

    from torchvision.datasets import CIFAR10  # the reference reader, with our files' checksums

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    class Synthetic(CIFAR10):
        train_list = [[n, md5(n)] for n, _ in CIFAR10.train_list]
        test_list = [[n, md5(n)] for n, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, 'md5': md5('batches.meta')}

    reference = Synthetic(str(tmp_path), train=True)
    assert reference.classes == CLASSES
    assert np.array_equal(reference.data, arrays['train'][0].transpose(0, 2, 3, 1))  # torchvision holds HWC
    assert reference.targets == arrays['train'][1].tolist()


def test_cifar_loader_reads_batches_meta_and_layout(tmp_path):
    arrays = synthetic_cifar(tmp_path)
    loaded, classes = load_cifar10(str(tmp_path))
    assert classes == CLASSES
    for split in ('train', 'test'):
        assert np.array_equal(loaded[split][0], arrays[split][0])  # (N, 3, 32, 32): R, G, B planes
        assert np.array_equal(loaded[split][1], arrays[split][1])


def test_cifar_loader_reads_plain_python3_pickles_too(tmp_path):
    """Files pickled by hand with bytes keys (not through write_cifar10)."""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    for i, name in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']):
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': x[i:i + 1], b'labels': [i]}, f, protocol=2)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [c.encode() for c in CLASSES]}, f, protocol=2)
    loaded, classes = load_cifar10(str(tmp_path))
    assert classes == CLASSES
    assert np.array_equal(loaded['train'][0].reshape(5, -1), x[:5]) and loaded['test'][1].tolist() == [5]


def test_cifar_missing_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(tv_utils, 'download_and_extract_archive', offline)
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path / 'data'))
    message = str(e.value)
    assert '\n' not in message and 'data_batch_1' in message and 'batches.meta' in message
    assert os.path.join(str(tmp_path / 'data'), 'cifar-10-batches-py') in message


# ---------------------------------------------------------------------------------------------
# Augmentation

def test_crop_translates_with_zero_fill():
    b, h, w, pad = 256, 8, 8, 2
    x = (torch.arange(h * w) + 1).view(1, 1, h, w).repeat(b, 2, 1, 1)  # unique nonzero pixel values
    torch.manual_seed(0)
    out = random_crop(x, pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = set()
    for i in range(b):
        v = out[i, 0, pad, pad].item() - 1  # the centre pixel is always inside the image
        dy, dx = v // w - pad, v % w - pad  # out[r, c] = x[r + dy, c + dx], zero outside
        expected = torch.zeros(2, h, w, dtype=x.dtype)
        ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        expected[:, ys, xs] = x[i, :, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
        assert torch.equal(out[i], expected), (i, dy, dx)
        offsets.add((dy, dx))
    assert len(offsets) == (2 * pad + 1) ** 2  # every shift in [-pad, pad]^2 occurs


def test_flip_mirrors_about_half_the_batch():
    x = torch.randint(0, 256, (200, 3, 5, 7), dtype=torch.uint8)
    torch.manual_seed(0)
    out = random_flip(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 60 < mirrored.sum() < 140


def test_augment_is_a_config_switch_for_train_only(tmp_path, config):
    synthetic_cifar(tmp_path)
    cfg = {**config, 'dataset': 'cifar10', 'data_dir': str(tmp_path)}
    assert load_data({**cfg, 'augment': False}, 'cpu').train.augment is None
    data = load_data({**cfg, 'augment': True}, 'cpu')
    assert data.val.augment is None and data.test.augment is None
    torch.manual_seed(0)  # the global RNG drives it, which training checkpoints for bitwise resume
    a = next(data.train.batches(16))[0]
    torch.manual_seed(0)
    b = next(data.train.batches(16))[0]
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (16, 3, 32, 32)
    assert not torch.equal(a, data.train.normalize(data.train.x[:16]))


# ---------------------------------------------------------------------------------------------
# The CNN

@pytest.mark.parametrize('variant', ['plain', 'residual'])
@pytest.mark.parametrize('depth', [0, 1, 3])
@pytest.mark.parametrize('in_channels, size', [(3, 32), (1, 28)])
def test_cnn_shapes_and_cam_hooks(variant, depth, in_channels, size):
    widths = [4, 8, 16]
    model = CNN(in_channels, 10, widths, depth=depth, variant=variant).eval()
    x = torch.randn(2, in_channels, size, size)
    a = model.features(x)
    assert a.shape == (2, 16, size // 8, size // 8)  # three MaxPool(2)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 16
    assert torch.allclose(model(x), model.classifier(a.mean((2, 3))), atol=1e-6)  # logits = W . GAP(A) + b
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs == len(widths) * (1 + 2 * depth)
    rebuilt = CNN(**model.args)  # what a checkpoint does
    rebuilt.load_state_dict(model.state_dict())


def test_plain_and_residual_differ_only_by_the_shortcut():
    from torchvision.models.resnet import BasicBlock
    plain, residual = (CNN(3, 10, [8, 16, 32], depth=2, variant=v) for v in ('plain', 'residual'))
    assert num_params(plain) == num_params(residual)
    assert sum(isinstance(m, BasicBlock) for m in residual.modules()) == 6
    assert not any(isinstance(m, BasicBlock) for m in plain.modules())
    with pytest.raises(ValueError):
        CNN(3, 10, [8], variant='dense')


# ---------------------------------------------------------------------------------------------
# Smoke runs through the command line

SMOKE = ['--max_steps', '2', '--subset', '64', '--wandb', 'off', '--device', 'cpu', '--epochs', '1']


def test_default_run_on_cifar_writes_best_checkpoint(tmp_path):
    from exercise_1_3 import config, main
    synthetic_cifar(tmp_path / 'data', n_train=100)
    cli(main, config, ['--data_dir', str(tmp_path / 'data'), '--runs_dir', str(tmp_path / 'runs'),
                       '--run_name', 'default', *SMOKE])
    run_dir = tmp_path / 'runs' / 'exercise_1_3' / 'default'
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['dataset'] == 'cifar10' and 0 <= results['test_acc'] <= 1
    model, ckpt = load_model(str(run_dir / 'checkpoints' / 'best.pt'))  # where exercise 2.3 looks
    assert isinstance(model, CNN) and model.args['variant'] == 'residual' and model.args['in_channels'] == 3
    assert ckpt.config['widths'] == config['widths'] and ckpt.config['augment'] is True


def test_fashion_mnist_one_channel_run(tmp_path):
    from exercise_1_3 import config, main
    write_mnist(str(tmp_path / 'data'), 'FashionMNIST', n_train=120, n_test=40)
    cli(main, config, ['--dataset', 'fashion_mnist', '--data_dir', str(tmp_path / 'data'), '--widths', '[8,16,32]',
                       '--model', 'plain', '--runs_dir', str(tmp_path / 'runs'), '--run_name', 'fm', *SMOKE])
    model, ckpt = load_model(str(tmp_path / 'runs' / 'exercise_1_3' / 'fm' / 'checkpoints' / 'best.pt'))
    assert model.args['in_channels'] == 1 and model.args['variant'] == 'plain'
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_study_and_gradients_smoke_and_resume(tmp_path, capsys):
    from exercise_1_3 import config, main
    argv = ['--part', 'study', '--dataset', 'digits', '--study_widths', '[4,8,8]', '--depths', '[1,2]',
            '--study_epochs', '1', '--batch_size', '32', '--runs_dir', str(tmp_path / 'runs'), *SMOKE,
            '--study_seeds', '[0]', '--study_lrs', '[]']  # one cell per (model, depth); the seeded study: 1.2's tests
    cli(main, config, argv)
    out = tmp_path / 'runs' / 'exercise_1_3'
    rows = (out / 'study.csv').read_text().splitlines()
    assert rows[0].startswith('model,depth') and len(rows) == 5
    assert {r.split(',')[0] for r in rows[1:]} == {'plain', 'residual'}
    assert (out / 'study_acc.png').exists() and (out / 'study_loss.png').exists()
    capsys.readouterr()
    cli(main, config, argv[:1] + ['grads'] + argv[2:])  # the study cells are done: grads reuses them
    printed = capsys.readouterr().out
    assert 'skip' not in printed and 'first/last' in printed and (out / 'grad_norms.png').exists()
    cli(main, config, argv)  # a second study run trains nothing
    again = capsys.readouterr().out
    assert again.count('skip') == 4 and 'epoch' not in again


def test_study_lr_grid_is_one_factor_2_grid_holding_every_datasets_lr():
    """The seeded study picks 1.3's lr from one grid for both models: it holds the lr every dataset's
    recipe trains with (so the seed-0 cell at --lr is one of the grid's), in factor-2 steps."""
    from dataset import DATASETS
    from exercise_1_3 import config
    grid = config['study_lrs']
    assert all(b == pytest.approx(2 * a) for a, b in zip(grid, grid[1:]))
    lrs = {name: info.defaults.get('exercise_1_3', {}).get('lr', config['lr']) for name, info in DATASETS.items()}
    assert all(lr in grid for lr in lrs.values()), lrs
