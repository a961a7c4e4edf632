"""Safe at the edges (issue 14): wrong files where a checkpoint goes, the CUDA RNG state of a run
resumed with fewer GPUs, tampered CIFAR pickles, and what a stopped or failing run says and
returns. CPU, offline, in-process (the scripts' `cli`), seconds. (2.2's impossible settings are
in test_exercise_2_2.py, many processes in test_distributed.py.)"""
import os
import pickle
import signal

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import exercise_1_1
import exercise_2_3 as ex23
import training
from config import UserError, cli
from dataset import load_data
from detect import with_background
from models import CNN, MLP
from synthetic import write_cifar10


def run(main, config: dict, argv: list[str], choices: dict | None = None) -> int:
    """A script as the shell runs it, in-process: its exit code (0 when it returns)."""
    try:
        cli(main, config, argv, choices=choices)
    except SystemExit as e:
        return e.code
    return 0


def argv_1_1(config: dict, **extra) -> list[str]:
    keys = ('dataset', 'hidden', 'dropout', 'epochs', 'batch_size', 'wandb', 'runs_dir', 'data_dir', 'device',
            'run_name')
    return [f'--{k}={v}' for k, v in {**{k: config[k] for k in keys}, **extra}.items()]


def save(path, model, config, exercise='exercise_1_1', **extra):
    torch.save({'model': model.state_dict(), 'model_class': type(model).__name__, 'model_args': model.args,
                'config': config, 'exercise': exercise, **extra}, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# A wrong file where a checkpoint goes: one line naming what was expected, nothing written

def test_checkpoints_a_script_cannot_use_are_one_line(tmp_path, config, capsys):
    mlp = save(tmp_path / 'mlp.pt', MLP(64, [16], 10), config)                      # exercise 1.1's model
    background = save(tmp_path / 'bg.pt', with_background(CNN(1, 10, [4, 8, 8], depth=0)), config, 'exercise_2_2')
    three = save(tmp_path / 'rgb.pt', CNN(3, 10, [4, 8, 8], depth=0), config, 'exercise_1_3')  # not for 8x8 grey
    model = MLP(64, [16], 10)
    tampered = str(tmp_path / 'tampered.pt')
    torch.save({'model': model.state_dict(), 'model_class': 'MLP', 'model_args': {**model.args, 'hidden': [32]},
                'config': config}, tampered)
    runs = config['runs_dir']

    # exercise 2.3 part 1 explains a CNN: an MLP used to end in "RuntimeError: einsum()"
    argv = ['--part', 'cnn', '--checkpoint', mlp, '--runs_dir', runs, '--wandb', 'off', '--device', 'cpu']
    assert run(ex23.main, ex23.config, argv) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{mlp} holds a MLP of exercise_1_1; expected a models.CNN' in err

    # evaluate.py: another head, another input shape, weights that do not fit their class
    for path, words in ((background, 'gives 11 scores on digits'), (three, 'gives no output on digits'),
                        (tampered, 'its weights do not fit a MLP')):
        with pytest.raises(UserError, match=words) as e:
            evaluate.main([path])
        assert '\n' not in str(e.value) and "expected a classifier's checkpoint" in str(e.value)

    # a usable checkpoint trained on CUDA is evaluated where evaluate.py runs (was: "CUDA is not available")
    cuda_run = save(tmp_path / 'cuda.pt', MLP(64, [16], 10), {**config, 'device': 'cuda'})
    evaluate.main([cuda_run])
    assert 'digits test acc' in capsys.readouterr().out

    # --resume of a file that holds a model but no training state (was: KeyError 'scheduler')
    os.makedirs(os.path.join(runs, 'exercise_1_1', 'x', 'checkpoints'))
    bare = save(os.path.join(runs, 'exercise_1_1', 'x', 'checkpoints', 'last.pt'), model, config)
    assert run(exercise_1_1.main, exercise_1_1.config, argv_1_1(config, resume=bare, run_name='')) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds no training state to resume (no optimizer, scheduler, rng)' in err
    assert os.listdir(os.path.join(runs, 'exercise_1_1', 'x')) == ['checkpoints']
    assert not os.path.exists(os.path.join(runs, 'exercise_2_3'))


# ---------------------------------------------------------------------------------------------
# Resume with fewer visible GPUs: a checkpoint holds its own device's CUDA RNG state

def test_cuda_rng_state_is_the_run_devices_own(monkeypatch):
    set_to = []
    index = lambda device: torch.device(device).index  # noqa: E731
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': torch.tensor([index(device)]))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, device='cuda': set_to.append((s.item(), index(device))))
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: pytest.fail('every visible GPU stored'))
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: pytest.fail('every visible GPU restored'))
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)

    state = checkpoint.cuda_rng_state(torch.device('cuda', 3))        # written by a run on cuda:3 of 4
    assert torch.equal(state, torch.tensor([3]))
    checkpoint.restore_cuda_rng(state, torch.device('cuda', 0))       # resumed where one GPU is visible
    assert set_to == [(3, 0)]

    old = [torch.tensor([10 + i]) for i in range(4)]                 # older checkpoints: one state per visible GPU
    checkpoint.restore_cuda_rng(old, torch.device('cuda', 1))
    checkpoint.restore_cuda_rng(old, torch.device('cuda'))             # no index: the current device's
    checkpoint.restore_cuda_rng(old[:1], torch.device('cuda', 2))      # not in the list: nothing, no IndexError
    checkpoint.restore_cuda_rng([], torch.device('cuda', 0))           # a CPU run's checkpoint resumed on CUDA
    assert set_to == [(3, 0), (11, 1), (10, None)]                   # None: the current device
    assert checkpoint.cuda_rng_state(torch.device('cpu')) is None


# ---------------------------------------------------------------------------------------------
# CIFAR pickles: only plain numeric arrays, rebuilt from bytes

class Reduced:
    """Pickles as the given reduce tuple: a way to write the globals and states a tampered file holds."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def array_pickle(dtype, raw: bytes, shape=(1,)):
    from numpy._core.multiarray import _reconstruct
    return Reduced(_reconstruct, (np.ndarray, (0,), b'b'), (1, shape, dtype, False, raw))


@pytest.mark.parametrize('payload', [
    # a structured dtype with an object field, its flags zeroed: numpy would read the file's bytes
    # as object pointers (NULL here, so that the old code does not crash the test run)
    lambda: array_pickle(Reduced(np.dtype, ('V8', False, True),
                                 (3, '|', None, ('a',), {'a': (np.dtype('O'), 0)}, 8, 1, 0)), bytes(8)),
    lambda: np.array([1, 'x'], dtype=object),                                         # an object array
    lambda: array_pickle(Reduced(np.dtype, ('u1', False, True), (3, '|', None, None, None, -1, -1, 63)), b'\x01'),
    lambda: np.zeros(2, dtype=[('r', 'u1'), ('g', 'u1')]),                           # structured, no objects
], ids=['object-field-crafted-flags', 'object-array', 'u1-with-object-flags', 'structured'])
def test_cifar_arrays_of_anything_but_plain_numbers_are_refused(tmp_path, payload):
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', 10), ('test', 5))}
    folder = write_cifar10(str(tmp_path), arrays, [str(i) for i in range(10)])
    with open(os.path.join(folder, 'data_batch_1'), 'wb') as f:
        pickle.dump({b'data': payload(), b'labels': [0]}, f, protocol=2)
    with pytest.raises(UserError) as e:
        load_data({'dataset': 'cifar10', 'data_dir': str(tmp_path), 'val_split': 0.1, 'subset': 0}, 'cpu')
    message = str(e.value)
    assert 'data_batch_1 is not a readable CIFAR pickle' in message and 'dtype' in message and '\n' not in message


def test_cifar_arrays_are_rebuilt_from_their_bytes(tmp_path):
    """The real files' arrays (and numpy scalars) still load, equal and writable, in any byte order."""
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', 10), ('test', 5))}
    write_cifar10(str(tmp_path), arrays, [str(i) for i in range(10)])
    data = load_data({'dataset': 'cifar10', 'data_dir': str(tmp_path), 'val_split': 0.2, 'subset': 0}, 'cpu')
    assert torch.equal(data.test.x, torch.from_numpy(arrays['test'][0]))
    from cifar_pickle import unpickle as _unpickle
    path = tmp_path / 'other.pkl'
    values = {b'big': np.arange(6, dtype='>i4').reshape(2, 3), b'f': np.arange(3, dtype='<f8'), b's': np.int64(7)}
    with open(path, 'wb') as f:
        pickle.dump(values, f, protocol=2)
    out = _unpickle(str(path))
    assert np.array_equal(out['big'], values[b'big']) and out['big'].flags.writeable
    assert np.array_equal(out['f'], values[b'f']) and out['s'] == 7


# ---------------------------------------------------------------------------------------------
# What a stopped or failing run says and returns

class SignalAtStep:
    """Send ourselves `signum` before the n-th training step of any model."""

    def __init__(self, signum, n: int):
        self.signum, self.n, self.seen = signum, n, 0

    def __enter__(self):
        def hook(module, args):
            if isinstance(module, MLP) and module.training:
                self.seen += 1
                if self.seen == self.n:
                    signal.raise_signal(self.signum)
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=['SIGTERM', 'SIGINT'])
def test_a_stopped_run_exits_128_plus_the_signal(config, capsys, signum, code):
    with SignalAtStep(signum, 5):
        assert run(exercise_1_1.main, exercise_1_1.config, argv_1_1(config)) == code
    out = capsys.readouterr().out
    assert out.count(f'{signal.Signals(signum).name}: stopping after this step') == 1 and 'resume with:' in out


def test_nan_message_names_last_pt_only_when_there_is_one(config, capsys):
    last = os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'last.pt')
    assert run(exercise_1_1.main, exercise_1_1.config,
               argv_1_1(config, lr=1e30, scheduler='none', optimizer='sgd')) == 1  # NaN in epoch 1 of a fresh run
    err = capsys.readouterr().err
    assert 'in epoch 1' in err and 'last.pt' not in err and 'No checkpoint was written' in err
    assert not os.path.exists(last)

    steps = [0]

    def poison(module, args, out):  # a finite first epoch (23 steps), then NaN
        steps[0] += module.training
        return out * float('nan') if steps[0] > 30 else out
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: poison(m, a, o) if isinstance(m, MLP) else None)
    try:
        assert run(exercise_1_1.main, exercise_1_1.config, argv_1_1(config, run_name='later')) == 1
    finally:
        handle.remove()
    err = capsys.readouterr().err
    later = os.path.join(config['runs_dir'], 'exercise_1_1', 'later', 'checkpoints', 'last.pt')
    assert 'in epoch 2' in err and f'The last good checkpoint is {later}' in err and os.path.exists(later)


def test_progress_lines_show_every_process_samples_per_second(capsys, monkeypatch):
    """Under torchrun each process trains a slice (here 20 of a global batch of 40): the progress
    line gives the global rate, as the epoch line does, not this process's; its loss says whose it is."""
    clock = [0.0]
    monkeypatch.setattr(training.time, 'perf_counter', lambda: clock[0])
    progress = training.Progress(20, 0, 'epoch 1/1', enabled=True, world=2)
    sums = torch.zeros(3)
    for step in range(1, 7):
        clock[0] = float(step)                                      # one second per step
        sums += torch.tensor([20 * 0.5, 10, 20])                    # this process: 20 samples per step
        progress.update(sums, 40)
    progress.close()
    assert capsys.readouterr().out.strip() == 'epoch 1/1  30% | loss (rank 0) 0.5000 | 40 samples/s'
