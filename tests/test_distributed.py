"""Many processes (README, "Many GPUs"): torchrun + DistributedDataParallel, tested on the CPU with
gloo. Every rank is a real process (this file run as a script, below), with a timeout.

What is checked, against a single-process run of the same config (no BatchNorm, dropout 0):
- the ranks' slices of every global batch are disjoint and together are the single-process
  batch, augmentation included (world sizes 1, 2, 4);
- after 2 epochs a 2-process run holds the single-process parameters (assert_close), and every
  rank holds the same parameters (exactly);
- rank 0 alone writes: rank 1 opens no file for writing under runs_dir (an audit hook watches);
- SIGTERM on both ranks stops both at the same step with one checkpoint; resuming it on 2 ranks
  ends exactly where the uninterrupted 2-rank run ends, and resuming it on 1 process ends where
  it ends too (up to float rounding);
- --sync_bn on the CPU is refused on every rank before anything is written;
- one command-line run through `torchrun --standalone --nproc_per_node 2`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from synthetic import write_idx  # noqa: E402

STEPS_RECORDED = 3  # training inputs each rank saves: the first global batches of epoch 1
STOP_AT = {0: 3, 1: 8}  # rank -> training step at which it is sent SIGTERM; the ranks agree at step 20
TIMEOUT = 90  # seconds for one multi-process launch; a hung collective fails the test instead of CI


# ---------------------------------------------------------------------------------------------
# Data: 28x28 images whose centre encodes the sample index, so that it survives the random crop
# (pad 3) and can be read back from what the model sees

def write_indexed_mnist(data_dir: str, n_train: int = 1200, n_test: int = 200) -> None:
    rng = np.random.default_rng(0)
    raw = os.path.join(data_dir, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for split, n, offset in (('train', n_train, 0), ('t10k', n_test, n_train)):
        x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        ids = np.arange(offset, offset + n)
        x[:, 4:14, 4:24] = (ids % 256)[:, None, None]  # a 3-pixel shift keeps (8, 14) inside
        x[:, 14:24, 4:24] = (ids // 256)[:, None, None]  # and (19, 14)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(os.path.join(raw, f'{split}-images-idx3-ubyte'), x)
        write_idx(os.path.join(raw, f'{split}-labels-idx1-ubyte'), y)


def sample_ids(x: torch.Tensor, split) -> list[int]:
    """Sample indices of a normalised (B, 1, 28, 28) batch of write_indexed_mnist images."""
    pixels = ((x * split.std + split.mean) * 255).round().long()
    return (pixels[:, 0, 8, 14] + 256 * pixels[:, 0, 19, 14]).tolist()


def make_config(tmp: str, data_dir: str = '') -> dict:
    """Exercise 1.1's config: an MLP (no BatchNorm), dropout 0, augmentation on (crop pad 3),
    1,080 train images in 27 global batches of 40 per epoch, 2 epochs, W&B off."""
    from exercise_1_1 import config
    return {**config, 'dataset': 'mnist', 'data_dir': data_dir or os.path.join(tmp, 'data'),
            'runs_dir': os.path.join(tmp, 'runs'),
            'augment': True, 'hidden': [32], 'dropout': 0.0, 'epochs': 2, 'batch_size': 40, 'device': 'cpu',
            'wandb': 'off', 'run_name': 'full'}


# ---------------------------------------------------------------------------------------------
# One rank (or the single process): what the tests compare

def fit(config: dict, overrides: dict | None = None, hook=None, report: bool = True):
    """Exercise 1.1 as its main() composes it, with an optional forward pre-hook on the model.
    Returns (model, run, history)."""
    from dataset import load_data
    from evaluate import report as write_report
    from models import MLP
    from record import Run
    from training import train
    run = Run('exercise_1_1', config, overrides, name='mlp')
    data = load_data(run.config, run.device)
    model = MLP(28 * 28, run.config['hidden'], 10, dropout=run.config['dropout'])
    if hook is not None:
        model.register_forward_pre_hook(hook)
    history = train(model, data, run)
    if report:
        write_report(run, model, data, history)
    return model, run, history


def recorder(inputs: list):
    """A forward pre-hook keeping the first STEPS_RECORDED training inputs."""
    def hook(module, args):
        if module.training and len(inputs) < STEPS_RECORDED:
            inputs.append(args[0].detach().clone())
    return hook


def sigterm_at(step: int):
    """A forward pre-hook that sends this process SIGTERM before training step `step`, as a
    scheduler (or torchrun, passing one on) does."""
    count = [0]

    def hook(module, args):
        count[0] += module.training
        if module.training and count[0] == step:
            signal.raise_signal(signal.SIGTERM)
    return hook


def watch_writes(root: str, found: list) -> None:
    """Audit hook: every file or folder this process creates, changes or removes under root."""
    root = os.path.abspath(root)

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def hook(event, args):
        if event == 'open' and under(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in 'wax+')) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                found.append(f'{event} {args[0]}')
        elif event in ('os.mkdir', 'os.rename', 'os.remove', 'os.rmdir', 'shutil.rmtree') and under(args[0]):
            found.append(f'{event} {args[0]}')
    sys.addaudithook(hook)


def worker(tmp: str, data_dir: str) -> None:
    """One rank of a launch (RANK, WORLD_SIZE... in the environment). Writes its findings to
    tmp/out/rank<r>.pt; the runs themselves write (rank 0 only) under tmp/runs."""
    import device
    from config import UserError
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    config = make_config(tmp, data_dir)
    found = {'writes': []}
    if rank > 0:
        watch_writes(config['runs_dir'], found['writes'])
    if world > 2:  # the shard test only: a few steps of one epoch
        inputs = []
        fit({**config, 'epochs': 1, 'max_steps': STEPS_RECORDED, 'run_name': f'shards{world}'},
            hook=recorder(inputs), report=False)
        torch.save({'inputs': inputs, **found}, os.path.join(tmp, 'out', f'rank{rank}.pt'))
        return

    try:  # refused on every rank, before the run starts
        fit({**config, 'sync_bn': True, 'run_name': 'sync-bn'})
        found['sync_bn'] = 'accepted'
    except UserError as e:
        found['sync_bn'] = str(e)

    inputs = []  # uninterrupted 2-rank run
    model, run, _ = fit(config, hook=recorder(inputs))
    found.update(inputs=inputs, full={k: v.clone() for k, v in model.state_dict().items()})

    try:  # SIGTERM to each rank at its own step: both must stop at the first agreed step (20)
        fit({**config, 'run_name': 'stopped'}, hook=sigterm_at(STOP_AT[rank]))
        found['stop_code'] = 0
    except SystemExit as e:
        found['stop_code'] = e.code
    last = os.path.join(config['runs_dir'], 'exercise_1_1', 'stopped', 'checkpoints', 'last.pt')
    if rank == 0:  # a copy for the test to resume on one process
        shutil.copytree(os.path.dirname(os.path.dirname(last)), os.path.join(tmp, 'stopped-copy'))
    device.barrier()

    model, run, history = fit({**config, 'run_name': 'stopped', 'resume': last}, {'resume': last})
    found.update(resumed={k: v.clone() for k, v in model.state_dict().items()}, resumed_epochs=len(history))
    torch.save(found, os.path.join(tmp, 'out', f'rank{rank}.pt'))


# ---------------------------------------------------------------------------------------------
# Launching ranks as a test

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(world: int, tmp: str, data_dir: str) -> list[dict]:
    """Run `world` ranks of worker(tmp, data_dir) as torchrun would (env://, gloo), one thread each.
    Returns each rank's findings; fails with every rank's output if any rank fails or hangs."""
    os.makedirs(os.path.join(tmp, 'out'), exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': str(world),
               'LOCAL_WORLD_SIZE': str(world), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
               'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline', 'MPLBACKEND': 'Agg'}
        procs.append(subprocess.Popen([sys.executable, __file__, tmp, data_dir], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world} ranks did not finish in {TIMEOUT} s:\n" + '\n'.join(p.communicate()[0] for p in procs))
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out}"
    return [{**torch.load(os.path.join(tmp, 'out', f'rank{r}.pt'), weights_only=True), 'output': outputs[r]}
            for r in range(world)]


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('ddp'))
    write_indexed_mnist(os.path.join(path, 'data'))
    return path


@pytest.fixture(scope='module')
def single(tmp):
    """The single-process run (no torchrun): inputs of its first batches and final parameters."""
    inputs = []
    config = {**make_config(tmp), 'runs_dir': os.path.join(tmp, 'single-runs')}
    model, run, history = fit(config, hook=recorder(inputs))
    from dataset import load_data
    return {'inputs': inputs, 'params': model.state_dict(), 'split': load_data(config, 'cpu').train,
            'config': config}


@pytest.fixture(scope='module')
def two(tmp):
    """Two ranks: sync_bn refusal, an uninterrupted run, a SIGTERM-stopped one and its resume."""
    return launch(2, tmp, os.path.join(tmp, 'data'))


# ---------------------------------------------------------------------------------------------
# Tests

@pytest.mark.parametrize('world', [1, 2, 4])
def test_shards_are_disjoint_and_make_up_the_single_process_batch(world, single, tmp, two):
    split = single['split']
    if world == 1:  # no slicing: the batch is the seeded permutation's next 40 samples, augmented in order
        seed = single['config']['seed']
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
        augment = torch.Generator().manual_seed(seed)
        ranks = [{'inputs': [split.normalize(split.augment(split.x[order[40 * i:40 * (i + 1)]], augment))
                             for i in range(STEPS_RECORDED)]}]
        assert not torch.equal(ranks[0]['inputs'][0], split.normalize(split.x[order[:40]]))  # augmented
    elif world == 2:
        ranks = two
    else:
        ranks = launch(4, os.path.join(tmp, 'four'), os.path.join(tmp, 'data'))
    for step in range(STEPS_RECORDED):
        batch = single['inputs'][step]  # (40, 1, 28, 28), augmented
        shards = [r['inputs'][step] for r in ranks]
        ids = [sample_ids(s, split) for s in shards]
        assert sum(map(len, ids)) == len(batch) and max(map(len, ids)) - min(map(len, ids)) <= 1
        assert len(set().union(*map(set, ids))) == len(batch)  # disjoint, and no sample twice
        assert set().union(*map(set, ids)) == set(sample_ids(batch, split))
        assert torch.equal(torch.cat(shards), batch)  # the same samples with the same crops, in order


def test_two_processes_train_the_single_process_model(single, two):
    for name, value in single['params'].items():
        torch.testing.assert_close(two[0]['full'][name], value, msg=name)
        assert torch.equal(two[0]['full'][name], two[1]['full'][name]), name  # DDP keeps ranks identical


def test_only_rank_0_writes(tmp, two):
    assert two[1]['writes'] == []
    run = os.path.join(tmp, 'runs', 'exercise_1_1', 'full')
    files = sorted(os.listdir(run))
    assert {'config.json', 'command.txt', 'results.json', 'curves.png', 'confusion.png', 'checkpoints'} <= set(files)
    assert sum(f.startswith('events.out.tfevents') for f in files) == 1
    results = json.load(open(os.path.join(run, 'results.json')))
    assert results['world_size'] == 2 and results['epochs_run'] == 2


def test_sync_bn_is_refused_on_the_cpu_on_every_rank(tmp, two):
    for rank in two:
        assert '--sync_bn True needs CUDA' in rank['sync_bn']
    assert not os.path.exists(os.path.join(tmp, 'runs', 'exercise_1_1', 'sync-bn'))


def test_sigterm_stops_every_rank_at_one_step_and_resumes_on_2_or_1_processes(tmp, single, two):
    from checkpoint import read as load_checkpoint
    assert [r['stop_code'] for r in two] == [143, 143]  # 128 + SIGTERM, as the shell reports it
    assert two[0]['output'].count('SIGTERM: stopping after this step') == 1  # one process speaks
    assert 'stopping after this step' not in two[1]['output'] and 'resume with' not in two[1]['output']
    stopped = load_checkpoint(os.path.join(tmp, 'stopped-copy', 'checkpoints', 'last.pt'))
    assert (stopped['epoch'], stopped['batch'], stopped['world_size']) == (0, 20, 2)
    assert stopped['sums'][2] == 20 * 40  # samples of all ranks so far this epoch

    for rank in two:  # on 2 ranks: exactly the uninterrupted 2-rank run
        assert rank['resumed_epochs'] == 2
        for name, value in two[0]['full'].items():
            assert torch.equal(rank['resumed'][name], value), name

    last = os.path.join(tmp, 'stopped-copy', 'checkpoints', 'last.pt')  # on 1 process
    model, run, history = fit({**single['config'], 'run_name': '', 'resume': last}, {'resume': last})
    assert [h['epoch'] for h in history] == [1, 2] and run.world == 1
    for name, value in two[0]['full'].items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    assert json.load(open(run.path('results.json')))['world_size'] == 1


GLOO_TEARDOWN_ABORT = 'terminate called without an active exception'


def test_torchrun_command_line(tmp_path):
    """Exercise 1.3 (a CNN with BatchNorm: per-rank batch statistics) through torchrun, as the README
    says to launch it; all three parts, so that study cells and gradient norms run under DDP too."""
    args = ['--dataset', 'digits', '--part', 'all', '--widths', '[4,8,8]', '--study_widths', '[4,8,8]',
            '--depths', '[1]', '--epochs', '1', '--study_epochs', '1', '--batch_size', '64', '--max_steps', '3',
            '--augment', 'False', '--device', 'cpu', '--wandb', 'off', '--runs_dir', str(tmp_path), '--run_name', 'ddp',
            '--study_seeds', '[0]', '--study_lrs', '[]']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             'exercise_1_3.py', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / 'exercise_1_3'
    assert json.loads((out / 'ddp' / 'results.json').read_text())['world_size'] == 2
    assert len((out / 'study.csv').read_text().splitlines()) == 3 and (out / 'grad_norms.png').exists()
    assert result.stdout.count('epoch   1/1 |') == 1  # rank 0 prints, rank 1 does not; study cells ...
    assert sum(line.startswith('study-') for line in result.stdout.splitlines()) == 2  # ... one line each

    # again, every cell finished: no run starts (none joins the process group), and still one
    # process prints the table and writes grad_norms.png and study.csv (tests/test_distributed.py parts)
    os.remove(out / 'grad_norms.png')
    parts_launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    __file__, 'parts', *args]
    result = subprocess.run(parts_launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode and GLOO_TEARDOWN_ABORT in result.stderr and 'exitcode: -6' in result.stderr:
        # A rank aborted in torch's Gloo teardown after every line was written (2 of 21 loaded suite runs,
        # this launch only; pytorch/pytorch#179291 describes the race). Still a defect (torchrun exits 1),
        # tracked in the issues; this launch repeats nothing but reads, so it may run once more.
        result = subprocess.run(parts_launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('first/last') == 1 and result.stdout.count('grad_norms.png') == 1
    assert result.stdout.count('wrote ' + str(out / 'study.csv')) == 1 and result.stdout.count('skip ') == 2
    assert (out / 'grad_norms.png').exists() and 'epoch ' not in result.stdout

    # the validation figures that chose best.pt are those of the model best.pt holds (BatchNorm
    # running statistics included), although every rank evaluated its own shard
    from dataset import load_data
    from evaluate import evaluate, load_model
    model, ckpt = load_model(str(out / 'ddp' / 'checkpoints' / 'best.pt'))
    val = evaluate(model, load_data(ckpt.config, 'cpu').val)
    assert val['loss'] == pytest.approx(ckpt.history[-1]['val/loss'], rel=1e-5)


def parts(argv: list[str]) -> None:
    """Exercise 1.3's grads part, then its study part, of cells that are all finished (one launch)."""
    import exercise_1_3
    from config import cli
    for part in ('grads', 'study'):
        cli(exercise_1_3.main, exercise_1_3.config, [*argv, '--part', part],
            choices={'dataset': ('cifar10', 'fashion_mnist', 'mnist', 'digits')})


if __name__ == '__main__':
    if sys.argv[1] == 'parts':
        parts(sys.argv[2:])
    else:
        worker(*sys.argv[1:])
