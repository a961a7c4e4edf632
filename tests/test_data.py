import os

import numpy as np
import pytest
import torch

from config import UserError
from conftest import write_idx, write_mnist
from dataset import load_data, read_idx


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_idx_round_trip(tmp_path, suffix):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(str(tmp_path / f'x{suffix}'), a)
    assert np.array_equal(read_idx(str(tmp_path / f'x{suffix}')), a)


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_idx(str(tmp_path / 'x'), np.zeros((4, 28, 28), np.uint8))
    data = (tmp_path / 'x').read_bytes()
    (tmp_path / 'x').write_bytes(data[:-10])
    with pytest.raises(UserError, match='truncated'):
        read_idx(str(tmp_path / 'x'))


def _ids(split):
    return (split.x[:, 0, 0, 0].long() + 256 * split.x[:, 0, 0, 1].long()).tolist()


@pytest.mark.parametrize('gz', [True, False])
@pytest.mark.parametrize('name, folder', [('mnist', 'MNIST'), ('fashion_mnist', 'FashionMNIST')])
def test_mnist_format_loads_into_uint8_splits(tmp_path, config, gz, name, folder):
    write_mnist(str(tmp_path), folder, n_train=300, n_test=100, gz=gz)
    data = load_data({**config, 'dataset': name, 'data_dir': str(tmp_path), 'val_split': 0.2}, 'cpu')
    assert data.shape == (1, 28, 28) and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (240, 60, 100)
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
    # the val split is held out of train: disjoint, and together they are the official train set
    train, val, test = set(_ids(data.train)), set(_ids(data.val)), set(_ids(data.test))
    assert not train & val and train | val == set(range(300)) and test == set(range(300, 400))
    x, y = next(data.train.batches(32))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 28, 28)
    assert abs(data.train.normalize(data.train.x).mean().item()) < 1e-4  # normalised with train statistics


def test_val_split_does_not_depend_on_run_seed(tmp_path, config):
    write_mnist(str(tmp_path))
    a = load_data({**config, 'dataset': 'mnist', 'data_dir': str(tmp_path), 'seed': 0}, 'cpu')
    b = load_data({**config, 'dataset': 'mnist', 'data_dir': str(tmp_path), 'seed': 1}, 'cpu')
    assert _ids(a.val) == _ids(b.val)


def test_digits_are_bundled(config):
    data = load_data(config, 'cpu')
    assert data.shape == (1, 8, 8) and len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.x.max() == 255


def test_batches_follow_order_and_start(config):
    split = load_data(config, 'cpu').train
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    batches = list(split.batches(100, order))
    assert torch.equal(torch.cat([y for _, y in batches]), split.y[order])
    assert torch.equal(list(split.batches(100, order, start=2))[0][1], batches[2][1])


def test_missing_data_offline_is_one_clear_line(run_script, tmp_path):
    # a proxy on a closed local port makes every download fail at once, as offline
    proxy = 'http://127.0.0.1:9'
    result = run_script('exercise_1_1.py', '--data_dir', str(tmp_path / 'data'), '--runs_dir', str(tmp_path / 'runs'),
                        '--wandb', 'off', env={'http_proxy': proxy, 'https_proxy': proxy, 'HTTP_PROXY': proxy,
                                               'HTTPS_PROXY': proxy, 'no_proxy': ''})
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith('error: could not download') and 'train-images-idx3-ubyte.gz' in error
    assert os.path.join(str(tmp_path / 'data'), 'MNIST', 'raw') in error
    assert 'https://' in error and '--data_dir' in error and '$DLA_DATA' in error and '--dataset digits' in error
    assert not (tmp_path / 'runs').exists() and 'W&B' not in result.stdout  # nothing started before the data


def test_channel_statistics_match_numpy():
    from dataset import _stats
    x = np.random.default_rng(0).integers(0, 256, (300, 3, 8, 8)).astype(np.uint8)
    f = x.astype(np.float64) / 255
    mean, std = _stats(x)
    assert np.allclose(mean, f.mean(axis=(0, 2, 3)), atol=1e-12) and np.allclose(std, f.std(axis=(0, 2, 3)), atol=1e-12)
