import json
import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from config import UserError
from conftest import write_mnist
from dataset import Split
from evaluate import evaluate, load_model
from checkpoint import read as load_checkpoint


class Lookup(nn.Module):
    """Returns stored logits for each input, found by the id written in pixel 0."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].round().long()]


def test_evaluate_matches_reference_metrics():
    g = torch.Generator().manual_seed(0)
    n, k = 300, 4
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) % 256
    split = Split(x=x[:256], y=y[:256], mean=torch.zeros(1, 1, 1, 1), std=torch.full((1, 1, 1, 1), 1 / 255))
    result = evaluate(Lookup(logits[:256]), split, batch_size=64)

    pred = logits[:256].argmax(1)
    expected = confusion_matrix(y[:256], pred, labels=range(k))
    assert np.array_equal(result['confusion'].numpy(), expected)
    assert result['acc'] == pytest.approx((pred == y[:256]).float().mean().item())
    assert result['loss'] == pytest.approx(nn.functional.cross_entropy(logits[:256], y[:256]).item(), rel=1e-5)
    assert result['per_class_acc'] == pytest.approx((expected.diagonal() / expected.sum(1)).tolist())


def test_checkpoint_rebuilds_its_model_alone(config, run_script, tmp_path):
    from exercise_1_1 import main
    main(config, {})
    best = os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'best.pt')
    model, ckpt = load_model(best)
    assert type(model).__name__ == 'MLP' and ckpt.config['hidden'] == [32]
    for a, b in zip(model.state_dict().values(), ckpt.model_state.values()):
        assert torch.equal(a, b)
    result = run_script('evaluate.py', best)
    results = json.load(open(os.path.join(os.path.dirname(os.path.dirname(best)), 'results.json')))
    assert result.returncode == 0 and f"{100 * results['test_acc']:.2f}%" in result.stdout


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


@pytest.mark.parametrize('content', [
    b'',                                                    # empty
    b'not a checkpoint at all',                            # garbage
    pickle.dumps(Evil()),                                  # code execution attempt: weights_only refuses it
    'tensor',                                              # a valid torch file, but not ours
], ids=['empty', 'garbage', 'pickle-exploit', 'foreign'])
def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / 'ckpt.pt'
    if content == 'tensor':
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(UserError, match='ckpt.pt'):
        load_checkpoint(str(path))
    assert path.read_bytes() == before


def test_truncated_checkpoint_refused_by_the_script(config, run_script, tmp_path):
    from exercise_1_1 import main
    main(config, {})
    last = os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'last.pt')
    data = open(last, 'rb').read()
    with open(last, 'wb') as f:
        f.write(data[: len(data) // 2])
    result = run_script('exercise_1_1.py', '--resume', last, '--wandb', 'off')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().startswith('error: ') and 'not a readable checkpoint' in result.stderr
    assert open(last, 'rb').read() == data[: len(data) // 2]  # nothing overwritten


def test_exercise_1_1_smoke_on_mnist_format_files(run_script, tmp_path):
    write_mnist(str(tmp_path / 'data'))
    result = run_script('exercise_1_1.py', '--data_dir', str(tmp_path / 'data'), '--runs_dir', str(tmp_path / 'runs'),
                        '--epochs', '2', '--max_steps', '3', '--hidden', '[64]', '--wandb', 'offline')
    assert result.returncode == 0, result.stderr
    [run_dir] = [os.path.join(tmp_path, 'runs', 'exercise_1_1', d)
                 for d in os.listdir(tmp_path / 'runs' / 'exercise_1_1')]
    assert os.path.basename(run_dir).startswith('mlp-64-mnist-')
    results = json.load(open(os.path.join(run_dir, 'results.json')))
    assert results['epochs_run'] == 2 and results['dataset'] == 'mnist'
    assert all(len(str(a)) <= 8 for a in results['per_class_acc'])  # rounded: no float32 noise
    # the whole console output of a small run with W&B on fits on one screen, with no colour codes
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    assert len(lines) <= 10 and '\x1b[' not in result.stdout + result.stderr, lines
    assert sum('wandb sync' in line for line in lines) == 1


def test_evaluate_help_prints_usage(capsys):
    from evaluate import main
    main(['--help'])
    assert capsys.readouterr().out.startswith('usage: python evaluate.py PATH/TO/checkpoint.pt')
