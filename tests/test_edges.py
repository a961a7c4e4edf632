"""Safe at the edges (issue 14): names, places, other processes and disk faults.

Each test names the promise it keeps; each fails on 6b52db1. CPU, offline, tiny digits runs.
"""
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import exercise_1_2
import exercise_2_2
import rundir
import study
import training
from config import UserError
from checkpoint import read as load_checkpoint
from record import Run
from training import digest
from test_trust import argv_of, run_1_1  # exercise 1.1 from the command line, in-process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_under(folder) -> dict:
    """Every file (hidden ones too) under folder -> its bytes."""
    out = {}
    for where, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(where, name), 'rb') as f:
                out[os.path.relpath(os.path.join(where, name), folder)] = f.read()
    return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished 1-epoch run (plain schedule, so it can be resumed for more epochs), trained once;
    copy_of() puts a copy of it where a test wants it."""
    from exercise_1_1 import config
    runs = tmp_path_factory.mktemp('template') / 'runs'
    cfg = {**config, 'dataset': 'digits', 'hidden': [32], 'dropout': 0.1, 'epochs': 1, 'batch_size': 64,
           'wandb': 'off', 'runs_dir': str(runs), 'data_dir': str(runs), 'device': 'cpu', 'run_name': 'test'}
    assert run_1_1(argv_of(cfg, scheduler='none')) == 0
    return os.path.join(runs, 'exercise_1_1', 'test')


def copy_of(trained: str, config: dict) -> str:
    """The trained run, copied to <config's runs_dir>/exercise_1_1/test. Returns its folder."""
    run_dir = os.path.join(config['runs_dir'], 'exercise_1_1', 'test')
    shutil.copytree(trained, run_dir)
    return run_dir


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'Traceback' not in err[0], err
    return err[0]


# ---------------------------------------------------------------------------------------------
# 1. Names and places

@pytest.mark.parametrize('name', ['..', '../..', '../x', '/tmp/abs', '.', 'a/b', 'a\\b', '-x', '.hidden', 'a\nb'])
def test_run_name_is_one_plain_folder_name(config, capsys, name):
    runs = os.path.join(config['runs_dir'], 'exercise_1_1')
    os.makedirs(os.path.join(runs, 'other-run'))
    with open(os.path.join(runs, 'other-run', 'config.json'), 'w') as f:
        f.write('{}')
    assert run_1_1(argv_of(config, run_name=name, overwrite=True)) == 2
    assert '--run_name' in error_line(capsys)
    assert os.listdir(runs) == ['other-run']  # nothing deleted, nothing written
    with pytest.raises(UserError, match='not a plain folder name'):  # the engine checks too, not only the CLI
        Run('exercise_1_1', {**config, 'run_name': name, 'overwrite': True})


def test_overwrite_never_deletes_what_is_not_a_run(config, capsys, tmp_path):
    runs = os.path.join(config['runs_dir'], 'exercise_1_1')
    os.makedirs(os.path.join(runs, 'notes'))
    with open(os.path.join(runs, 'notes', 'mine.txt'), 'w') as f:
        f.write('precious')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'config.json').write_text('{}')
    os.symlink(elsewhere, os.path.join(runs, 'link'))
    for name in ('notes', 'link'):
        assert run_1_1(argv_of(config, run_name=name, overwrite=True, epochs=1)) == 1
        assert 'not touching it' in error_line(capsys)
    assert open(os.path.join(runs, 'notes', 'mine.txt')).read() == 'precious'
    assert os.listdir(elsewhere) == ['config.json'] and os.path.islink(os.path.join(runs, 'link'))


def test_runs_dir_that_is_a_file_is_one_line(config, capsys, tmp_path):
    path = tmp_path / 'a-file'
    path.write_text('x')
    assert run_1_1(argv_of(config, runs_dir=str(path), epochs=1)) == 1
    assert 'is not a folder' in error_line(capsys) and path.read_text() == 'x'


# ---------------------------------------------------------------------------------------------
# 2. --overwrite keeps the old run until the new one has its first checkpoint

def test_overwrite_keeps_the_old_run_until_the_first_checkpoint(config, capsys, monkeypatch, trained):
    runs = os.path.join(config['runs_dir'], 'exercise_1_1')
    old = files_under(copy_of(trained, config))
    # dies of a non-finite loss in epoch 1
    assert run_1_1(argv_of(config, epochs=1, overwrite=True, lr=1e30, scheduler='none')) == 1
    assert 'training loss became' in capsys.readouterr().err
    assert files_under(os.path.join(runs, 'test')).keys() == old.keys() and os.listdir(runs) == ['test']
    assert {k: v for k, v in files_under(os.path.join(runs, 'test')).items() if k != '.lock'} == \
        {k: v for k, v in old.items() if k != '.lock'}
    # interrupted (a second Ctrl-C) before its first checkpoint

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, 'evaluate', interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_1_1(argv_of(config, epochs=1, overwrite=True))
    monkeypatch.undo()
    assert {k: v for k, v in files_under(os.path.join(runs, 'test')).items() if k != '.lock'} == \
        {k: v for k, v in old.items() if k != '.lock'}
    assert os.listdir(runs) == ['test']
    # a replacement that checkpoints replaces it, and nothing is left aside
    assert run_1_1(argv_of(config, epochs=2, overwrite=True)) == 0
    with open(os.path.join(runs, 'test', 'results.json')) as f:
        assert json.load(f)['epochs_run'] == 2
    assert os.listdir(runs) == ['test']


def test_a_replacement_killed_before_its_first_checkpoint_gives_the_old_run_back(config, capsys, trained):
    """The state kill -9 leaves mid-replacement: the old run kept aside, the new one's stub in its place."""
    runs = os.path.join(config['runs_dir'], 'exercise_1_1')
    old = {k: v for k, v in files_under(copy_of(trained, config)).items() if k != '.lock'}
    os.rename(os.path.join(runs, 'test'), os.path.join(runs, '.test.replaced-999999'))
    os.makedirs(os.path.join(runs, 'test'))
    with open(os.path.join(runs, 'test', 'config.json'), 'w') as f:
        f.write('{}')
    with open(os.path.join(runs, 'test', '.lock'), 'w') as f:
        f.write('process 999999 on elsewhere\n')
    assert run_1_1(argv_of(config, epochs=1)) == 1  # the next start of that name, without --overwrite
    assert 'already exists' in error_line(capsys)
    assert {k: v for k, v in files_under(os.path.join(runs, 'test')).items() if k != '.lock'} == old
    assert os.listdir(runs) == ['test']


# ---------------------------------------------------------------------------------------------
# 3. A checkpoint from outside the runs folder continues in a run folder, never beside the file

def test_resume_from_outside_a_run_folder_writes_nothing_beside_the_file(config, capsys, tmp_path, trained):
    copy_of(trained, config)
    outside = tmp_path / 'x' / 'y'
    outside.mkdir(parents=True)
    shutil.copy(os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'last.pt'), outside / 'l.pt')
    # its own name (test) is taken in this runs folder: one line, nothing written
    assert run_1_1(argv_of(config, epochs=2, resume=str(outside / 'l.pt'), scheduler='none')) == 1
    assert 'give another --run_name' in error_line(capsys)
    assert run_1_1(argv_of(config, epochs=2, resume=str(outside / 'l.pt'), scheduler='none', run_name='cont')) == 0
    assert sorted(os.listdir(tmp_path / 'x')) == ['y'] and os.listdir(outside) == ['l.pt']
    cont = os.path.join(config['runs_dir'], 'exercise_1_1', 'cont')
    with open(os.path.join(cont, 'results.json')) as f:
        assert json.load(f)['epochs_run'] == 2
    assert load_checkpoint(os.path.join(cont, 'checkpoints', 'last.pt'))['epoch'] == 2


# ---------------------------------------------------------------------------------------------
# 4. One process per run folder

HOLDER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    from record import Run
    config, overrides = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    run = Run('exercise_1_1', config, overrides)  # a resumed run: holds its folder from here on
    print('holding', flush=True)
    time.sleep(120)
""")


def test_a_run_is_held_by_one_process_and_a_killed_ones_lock_is_taken_over(config, capsys, trained):
    run_dir = copy_of(trained, config)
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    resume = {'resume': last, 'epochs': 2}
    holder = subprocess.Popen([sys.executable, '-c', HOLDER.format(root=ROOT), json.dumps({**config, **resume}),
                               json.dumps(resume)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        assert holder.stdout.readline().strip() == 'holding'
        before = files_under(run_dir)
        # a fresh run of the same name (it would replace it), and a second resume of it
        assert run_1_1(argv_of(config, epochs=1, seed=1, overwrite=True)) == 1
        assert f'is in use by process {holder.pid}' in error_line(capsys)
        assert run_1_1(argv_of(config, epochs=2, scheduler='none', resume=last)) == 1
        assert f'is in use by process {holder.pid}' in error_line(capsys)
        assert files_under(run_dir) == before
        # killed (kill -9): the next resume takes the run over and says so
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        run = Run('exercise_1_1', {**config, **resume, 'scheduler': 'none'}, resume)
        assert f'took over from process {holder.pid}' in capsys.readouterr().out
        rundir.release(run.dir)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_two_fresh_runs_of_one_name_the_second_is_refused(config):
    """The second process comes between the first one's check and its start (data loading)."""
    first = Run('exercise_1_1', config)
    second = Run('exercise_1_1', {**config, 'seed': 1})  # both checked the name before either started
    first.start()
    held = getattr(rundir, '_HELD', {})  # this process's claims: hide first's, so second meets it as another would
    fd = held.pop(os.path.realpath(first.dir), None)
    try:
        with pytest.raises(UserError, match='is in use by process'):
            second.start()
    finally:
        if fd is not None:
            held[os.path.realpath(first.dir)] = fd
    first.finish()
    with open(os.path.join(first.dir, 'config.json')) as f:
        assert json.load(f)['seed'] == 0


# ---------------------------------------------------------------------------------------------
# 5. Disk faults: one line, the last good checkpoint kept, no temp file

def fail(code):
    def raiser(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return raiser


@pytest.mark.parametrize('target, code', [
    ('checkpoint', errno.ENOSPC), ('tensorboard', errno.EROFS), ('figure', errno.EACCES), ('json', errno.EFBIG)])
def test_a_write_the_disk_refuses_is_one_line_and_keeps_the_last_good_checkpoint(config, capsys, monkeypatch,
                                                                                  target, code, trained):
    run_dir = copy_of(trained, config)
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    good = open(last, 'rb').read()
    if target == 'checkpoint':
        monkeypatch.setattr(torch, 'save', fail(code))
    elif target == 'tensorboard':
        from torch.utils.tensorboard import SummaryWriter
        monkeypatch.setattr(SummaryWriter, 'add_scalar', fail(code))
    elif target == 'figure':
        from matplotlib.figure import Figure
        monkeypatch.setattr(Figure, 'savefig', fail(code))
    else:
        monkeypatch.setattr(json, 'dump', fail(code))
    capsys.readouterr()
    assert run_1_1(argv_of(config, epochs=2, scheduler='none', resume=last)) == 1
    assert os.strerror(code) in error_line(capsys)
    monkeypatch.undo()
    assert load_checkpoint(last)['epoch'] in (1, 2)
    if target == 'checkpoint':
        assert open(last, 'rb').read() == good
    assert not glob.glob(os.path.join(run_dir, '**', '*.tmp'), recursive=True)
    assert not glob.glob(os.path.join(run_dir, '**', '.*.tmp'), recursive=True)


def test_a_full_disk_for_real_is_one_line(config, capsys, tmp_path, monkeypatch):
    """A 2 MiB tmpfs (root only; skipped where mount is not permitted): torch.save to a full disk."""
    mnt = tmp_path / 'small'
    mnt.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        runs = str(mnt / 'runs')
        assert run_1_1(argv_of(config, epochs=1, scheduler='none', runs_dir=runs)) == 0
        last = os.path.join(runs, 'exercise_1_1', 'test', 'checkpoints', 'last.pt')
        good = open(last, 'rb').read()
        fill = mnt / 'fill'
        real_log = Run.log

        def log_then_fill_the_disk(self, *args, **kwargs):
            real_log(self, *args, **kwargs)
            if not fill.exists():
                with open(fill, 'wb') as f:
                    try:
                        f.write(b'\0' * (4 << 20))
                    except OSError:
                        pass
        monkeypatch.setattr(Run, 'log', log_then_fill_the_disk)
        capsys.readouterr()
        assert run_1_1(argv_of(config, epochs=3, scheduler='none', runs_dir=runs, resume=last)) == 1
        assert 'No space left on device' in error_line(capsys)
        checkpoint = load_checkpoint(last)
        assert checkpoint['epoch'] == 2 or open(last, 'rb').read() == good
        assert not glob.glob(os.path.join(runs, '**', '.*.tmp'), recursive=True)
    finally:
        for key in [k for k in getattr(rundir, '_HELD', {}) if k.startswith(str(mnt))]:
            rundir.release(key)  # the failed run's claim, held until exit otherwise
        subprocess.run(['umount', '-l', str(mnt)], capture_output=True)


def test_temp_files_and_a_lock_left_by_a_killed_process_are_cleared_on_resume(config, capsys, trained):
    run_dir = copy_of(trained, config)
    orphan = os.path.join(run_dir, 'checkpoints', '.last.pt.k3x_9a0q.tmp')  # atomic_write's name, cut off
    with open(orphan, 'wb') as f:
        f.write(b'\0' * 1000)
    mine = os.path.join(run_dir, 'notes.tmp')  # not our pattern: left alone
    open(mine, 'w').close()
    with open(os.path.join(run_dir, '.lock'), 'w') as f:
        f.write('process 999999 on elsewhere\n')  # a holder that ended without releasing: kill -9
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    resume = {'resume': last, 'epochs': 2}
    run = Run('exercise_1_1', {**config, **resume, 'scheduler': 'none'}, resume)
    out = capsys.readouterr().out
    assert 'took over from process 999999 on elsewhere' in out and 'removed 1 temp file' in out
    assert not os.path.exists(orphan) and os.path.exists(mine)
    rundir.release(run.dir)


# ---------------------------------------------------------------------------------------------
# 8. One list of "where and how it runs" keys

def test_a_study_cell_resumes_where_and_how_this_command_runs(tmp_path, monkeypatch):
    overrides = {'part': 'study', 'dataset': 'digits', 'depths': [2], 'study_width': 16, 'study_epochs': 2,
                 'batch_size': 64, 'wandb': 'off', 'device': 'cpu', 'subset': 320, 'runs_dir': str(tmp_path)}
    calls = []
    real = training.evaluate

    def stop_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(training, 'evaluate', stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    monkeypatch.undo()
    [cell] = glob.glob(str(tmp_path / 'exercise_1_2' / 'study-plain-d2-*'))
    last = os.path.join(cell, 'checkpoints', 'last.pt')
    # as if the cell had been started on a GPU machine with W&B on
    ckpt = torch.load(last, weights_only=True)
    ckpt['config'] = {**ckpt['config'], 'device': 'cuda', 'wandb': 'offline', 'data_dir': '/gone', 'amp': 'on'}
    torch.save(ckpt, last)
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    with open(os.path.join(cell, 'results.json')) as f:
        assert json.load(f)['device'] == 'cpu'
    with open(os.path.join(cell, 'config.json')) as f:
        used = json.load(f)
    assert (used['device'], used['wandb'], used['amp']) == ('cpu', 'off', exercise_1_2.config['amp'])
    assert not os.path.exists(os.path.join(cell, 'wandb'))


def test_2_2_fine_tune_identity_is_every_key_but_where_and_how_it_runs():
    config = exercise_2_2.config

    def identity(**changes):
        cfg = {**config, **changes}
        return digest({k: cfg[k] for k in exercise_2_2.FINETUNE_KEYS})
    assert identity(momentum=0.5) != identity()  # a fine-tune trained with another momentum is not reused
    assert identity(device='cuda', wandb='off', data_dir='/x', amp='on', compile=True) == identity()
    base = {**exercise_1_2.config, 'model': 'plain', 'depth': 2}
    assert study.cell_id({**base, 'device': 'cuda', 'wandb': 'off', 'part': 'grads'}) == study.cell_id(base)
