"""Every run comparable and traceable (issue 16, and issue 15's metrics dropped by W&B).

One small run of every script, W&B offline, is made once per module; the tests read back what
the run left with the loggers' own readers: TensorBoard's EventAccumulator and the W&B
transaction log (run-<id>.wandb, a LevelDB-style log of protobuf records, read here with W&B's
own protobuf classes)."""
import contextlib
import csv
import glob
import io
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from config import cli
from synthetic import write_cifar10, write_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
W = ['--wandb', 'offline', '--device', 'cpu']


# ---------------------------------------------------------------------------------------------
# Readers

def wandb_records(run_dir: str):
    """The protobuf records of the W&B run under run_dir/wandb/ (exactly one run expected), once the
    file holds its exit record: W&B's service process writes the file and may still be flushing it
    when the script that logged has exited (seen once in 20 loaded suite runs: a summary key missing)."""
    [path] = glob.glob(os.path.join(run_dir, 'wandb', '*run-*', 'run-*.wandb'))
    for _ in range(20):  # up to 10 s (the flush takes well under a second); a run without one is read as it is
        records = list(_records(path))
        if any(r.WhichOneof('record_type') == 'exit' for r in records):
            break
        time.sleep(0.5)
    yield from records


def _records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    pos, chunk = 7, b''  # header: ':W&B', magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # 32 KiB blocks; a block tail too short for a header is padding
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])  # crc32c, length, FULL/FIRST/MIDDLE/LAST
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b''
            yield record


def wandb_run(run_dir: str) -> dict:
    """{'history': {step: {key: value}}, 'summary': {...}, 'config': {...}} of an offline W&B run."""
    out: dict = {'history': {}, 'summary': {}, 'config': {}}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof('record_type')
        if kind == 'history':
            row = {'/'.join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            out['history'].setdefault(row['_step'], {}).update(row)
        elif kind in ('summary', 'config'):
            for i in getattr(r, kind).update:
                out[kind]['/'.join(i.nested_key) or i.key] = json.loads(i.value_json)
    return out


def wandb_table(run_dir: str, name: str) -> list[dict]:
    [path] = glob.glob(os.path.join(run_dir, 'wandb', '*run-*', 'files', 'media', 'table', f'{name}_*.table.json'))
    with open(path) as f:
        table = json.load(f)
    return [dict(zip(table['columns'], row)) for row in table['data']]


def tensorboard(run_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir, size_guidance={'tensors': 0, 'scalars': 0})
    acc.Reload()
    return acc


def results_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, 'results.json')) as f:
        return json.load(f)


def config_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, 'config.json')) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# One small run of every script, W&B offline

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """{'root', 'runs_dir', 'out': {script: console}, 'dirs': {script: [run dirs]}}"""
    import exercise_1_1
    import exercise_1_2
    import exercise_1_3
    import exercise_2_2
    import exercise_2_3
    root = tmp_path_factory.mktemp('trace')
    runs_dir, out = str(root / 'runs'), {}
    rng = np.random.default_rng(0)
    write_cifar10(str(root / 'cifar'), {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                                            rng.integers(0, 10, n)) for s, n in (('train', 80), ('test', 40))},
                  CIFAR_CLASSES)
    mnist = write_mnist(str(root / 'mnist'), n_train=200, n_test=60)
    r = ['--runs_dir', runs_dir]
    commands = {
        'exercise_1_1': (exercise_1_1, ['--dataset', 'digits', '--hidden', '[16]', '--epochs', '2', *W, *r]),
        'exercise_1_2': (exercise_1_2, ['--dataset', 'digits', '--part', 'study', '--depths', '[2]', '--study_width',
                                        '8', '--study_epochs', '1', '--max_steps', '2', '--study_seeds', '[0]',
                                        '--study_lrs', '[]', *W, *r]),
        'exercise_1_3': (exercise_1_3, ['--data_dir', str(root / 'cifar'), '--part', 'single', '--widths', '[8,16,32]',
                                        '--max_steps', '2', '--subset', '64', '--epochs', '1', '--batch_size', '32',
                                        '--run_name', 'tiny', *W, *r]),
        'exercise_2_2': (exercise_2_2, ['--data_dir', mnist, '--epochs', '1', '--max_steps', '2', '--finetune_epochs',
                                        '1', '--finetune_canvases', '12', '--test_canvases', '4', '--val_canvases', '3',
                                        '--widths', '[4,8,16]', '--figure_canvases', '2', *W, *r]),
        'exercise_2_3': (exercise_2_3, ['--checkpoint', os.path.join(runs_dir, 'exercise_1_3', 'tiny', 'checkpoints',
                                                                     'best.pt'), '--part', 'cnn',
                                        '--faithfulness_images', '8', '--faithfulness_steps', '4',
                                        '--per_class', '[1,0]', '--batch_size', '16', *W, *r]),
    }
    for script, (module, argv) in commands.items():
        before = set(glob.glob(os.path.join(runs_dir, '*', '*', 'config.json')))
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            cli(module.main, module.config, argv)
        out[script] = text.getvalue()
        after = set(glob.glob(os.path.join(runs_dir, '*', '*', 'config.json')))
        out[script + ' dirs'] = sorted(os.path.dirname(p) for p in after - before)
    return {'root': root, 'runs_dir': runs_dir, 'out': out}


def all_run_dirs(runs) -> list[str]:
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(runs['runs_dir'], '*', '*', 'results.json')))


# ---------------------------------------------------------------------------------------------
# Issue 15 item 4: W&B keeps every metric the console printed

EPOCH = re.compile(r'epoch +(\d+)/\d+ \| train loss ([\d.]+) acc +([\d.]+) \| '
                   r'val loss ([\d.]+) acc +([\d.]+) \| lr (\S+)')


def test_wandb_history_has_every_metric_the_console_printed(runs):
    out = runs['out']
    # training scripts (every cell and stage too): every printed epoch line and test accuracy is
    # in the W&B history of one of the script's runs, and every run logged all its epochs
    for script in ('exercise_1_1', 'exercise_1_2', 'exercise_1_3', 'exercise_2_2'):
        trained = [d for d in out[script + ' dirs'] if os.path.exists(os.path.join(d, 'checkpoints', 'best.pt'))]
        assert trained, script
        logged, tests = set(), set()
        for run_dir in trained:
            history, results = wandb_run(run_dir)['history'], results_of(run_dir)
            epochs = {step: row for step, row in history.items() if 'train/loss' in row}
            assert sorted(epochs) == list(range(1, results['epochs_run'] + 1)), run_dir
            for epoch, row in epochs.items():
                assert {'train/epoch_seconds', 'train/samples_per_second'} <= set(row), run_dir  # the line's timings
                logged.add((str(epoch), f"{row['train/loss']:.4f}", f"{100 * row['train/acc']:.2f}",
                            f"{row['val/loss']:.4f}", f"{100 * row['val/acc']:.2f}", f"{row['train/lr']:.2e}"))
            summary = wandb_run(run_dir)['summary']  # one-off results: W&B's summary, not its history
            assert (summary['test_acc'], summary['test_loss']) == (results['test_acc'], results['test_loss']), run_dir
            tests.add((f"{100 * summary['test_acc']:.2f}", f"{summary['test_loss']:.4f}"))
        printed = EPOCH.findall(out[script])
        cells = script == 'exercise_1_2'  # study cells print one line each, no epoch lines (issue 15 item 6)
        assert (printed or cells) and set(printed) <= logged, (script, set(printed) - logged)
        printed = re.findall(r'test acc ([\d.]+)% \(loss ([\d.]+)\)', out[script])
        assert (printed or cells) and set(printed) <= tests, (script, set(printed) - tests)
        if cells:
            printed = re.findall(r': test acc ([\d.]+)% \(best val', out[script])
            assert printed and set(printed) <= {acc for acc, _ in tests}, (script, printed, tests)
    # 2.2: every number printed on a track's lines (the track table, the box ablation) is in W&B's
    # summary or tables: one-off results are not scalar history (issue 21 part 8)
    from exercise_2_2 import TRACKS
    [detect] = [d for d in out['exercise_2_2 dirs'] if os.path.basename(d).startswith('detect-')]
    summary = wandb_run(detect)['summary']
    rows = wandb_table(detect, 'tracks') + wandb_table(detect, 'box_ablation')
    assert not {k for row in wandb_run(detect)['history'].values() for k in row
                if k.startswith(tuple(f'{name}/' for name in TRACKS))}  # no one-dot charts
    assert numbers_printed_are_logged(re.sub(r'mAP@0\.5|mAP@\[\.5:\.95\]', 'mAP', out['exercise_2_2']), {
        label: {**{k: v for k, v in summary.items() if isinstance(v, float)
                   and k.startswith((f'tracks/{name}/', f'box_ablation/{name}/'))},
                **{f'{i}/{k}': v for i, row in enumerate(rows) if row['track'] == name for k, v in row.items()
                   if isinstance(v, float)}}
        for name, label in TRACKS.items()}) >= 2 * 9
    # 2.3: the test accuracy and every cell of the printed faithfulness tables, found in W&B's summary
    # and tables: one-off results are not scalar history (issue 21 part 8)
    from explain import BETTER
    from explain_display import LABELS
    [cam] = out['exercise_2_3 dirs']
    logged = wandb_run(cam)
    assert not [k for row in logged['history'].values() for k in row if k.startswith(('cnn/', 'cnn_sensitivity/'))]
    acc = float(re.search(r'test acc ([\d.]+)%', out['exercise_2_3']).group(1))
    assert round(100 * logged['summary']['cnn_setup/test_acc'], 2) == pytest.approx(acc)
    chosen, _, sensitivity = out['exercise_2_3'].partition('SENSITIVITY')  # the other substrate's table
    for name, console in (('cnn_faithfulness_table', chosen), ('cnn_sensitivity_faithfulness_table', sensitivity)):
        rows = {row['method']: row for row in wandb_table(cam, name)}
        table_lines = '\n'.join(line for line in console.splitlines() if ' [' in line)  # value [ci]
        assert numbers_printed_are_logged(table_lines, {
            label: {k: v for k, v in rows[method].items() if k in BETTER or '/ci95_' in k}
            for method, label in LABELS.items()}) == 3 * 4 * len(LABELS)  # each metric and its interval


def numbers_printed_are_logged(console: str, values: dict[str, dict]) -> int:
    """Every decimal number on a console line that starts with a label is one of that label's
    logged values, rounded as printed. Returns how many numbers were checked."""
    checked = 0
    for line in console.splitlines():
        label = next((k for k in sorted(values, key=len, reverse=True) if line.strip().startswith(k + ' ')
                      or line.strip().startswith(k + ':')), None)  # 'random smooth' before 'random'
        for number in re.findall(r'\d+\.\d+', line.strip()[len(label):] if label else ''):
            decimals = len(number.split('.')[1])
            assert number in {f'{v:.{decimals}f}' for v in values[label].values()}, (line, number)
            checked += 1
    return checked


def test_a_step_below_the_current_one_is_not_silent(tmp_path, capsys):
    """W&B ignores a row logged below its current step: Run.log says so rather than losing it quietly."""
    from record import Run
    from exercise_1_1 import config
    run = Run('exercise_1_1', {**config, 'dataset': 'digits', 'wandb': 'off', 'runs_dir': str(tmp_path),
                               'device': 'cpu'})
    run.log({'a': 1.0}, step=3)
    run.log({'b': 1.0}, step=0)
    run.finish()
    assert "['b'] logged at step 0 after step 3" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Item 2: W&B summary = results.json, results tables as wandb.Tables

def test_wandb_summary_and_config_hold_results_and_provenance(runs):
    dirs = all_run_dirs(runs)
    assert len(dirs) == 8  # 1.1; 1.2's two cells; 1.3; 2.2's two stages and detector; 2.3
    for run_dir in dirs:
        results, logged = results_of(run_dir), wandb_run(run_dir)
        flat = {}

        def walk(d, prefix=''):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f'{prefix}{k}/')
                elif isinstance(v, (bool, int, float, str)):
                    flat[prefix + k] = v
        walk({k: v for k, v in results.items() if k != 'provenance'})
        assert flat, run_dir
        for k, v in flat.items():
            assert logged['summary'].get(k) == (pytest.approx(v) if isinstance(v, float) else v), (run_dir, k)
        prov = logged['config']['provenance']
        assert prov['git_commit'] == results['provenance']['git_commit']
        assert prov['ended'] == results['provenance']['ended']  # the final provenance, not the one at start
        assert prov['data'] == results['provenance']['data']


def test_results_tables_reach_wandb(runs):
    rd = runs['runs_dir']
    # the study table = study.csv, in a short W&B run of its own
    with open(os.path.join(rd, 'exercise_1_2', 'study.csv')) as f:
        rows = list(csv.DictReader(f))
    table = wandb_table(os.path.join(rd, 'exercise_1_2', 'study'), 'study')
    assert [r['cell'] for r in table] == [r['cell'] for r in rows]
    assert [r['test_acc'] for r in table] == pytest.approx([float(r['test_acc']) for r in rows])
    # 2.2's track table, 2.3's faithfulness table = results.json
    [detect] = glob.glob(os.path.join(rd, 'exercise_2_2', 'detect-*'))
    tracks = results_of(detect)['tracks']
    table = wandb_table(detect, 'tracks')
    assert [r['track'] for r in table] == list(tracks)
    for r in table:
        assert r['map_50'] == pytest.approx(tracks[r['track']]['map_50'])
        assert r['f1'] == pytest.approx(tracks[r['track']]['f1'])
    [cam] = glob.glob(os.path.join(rd, 'exercise_2_3', 'cam-*'))
    faith = results_of(cam)['cnn']
    table = wandb_table(cam, 'cnn_faithfulness_table')
    assert [r['method'] for r in table] == list(faith)
    for r in table:
        assert r['deletion_auc'] == pytest.approx(faith[r['method']]['deletion_auc'])
        assert r['average_drop'] == pytest.approx(faith[r['method']]['average_drop'])
    assert table[0]['beats_random/insertion_auc'] == faith['cam']['beats_random']['insertion_auc']


# ---------------------------------------------------------------------------------------------
# Item 1: TensorBoard HParams and the config as text

def test_tensorboard_hparams_and_config_text_for_every_run(runs):
    from tensorboard.plugins.hparams import metadata
    for run_dir in all_run_dirs(runs):
        acc, config, results = tensorboard(run_dir), config_of(run_dir), results_of(run_dir)
        content = acc.PluginTagToContent('hparams')
        assert metadata.SESSION_START_INFO_TAG in content and metadata.SESSION_END_INFO_TAG in content, run_dir
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: v.WhichOneof('kind') and getattr(v, v.WhichOneof('kind')) for k, v in start.hparams.items()}
        assert set(hp) == set(config), run_dir
        for k, v in config.items():
            if isinstance(v, (list, dict)) or v is None:
                assert json.loads(hp[k]) == v, (run_dir, k)  # lists as text
            else:
                assert hp[k] == v, (run_dir, k)
        for key in ('test_acc', 'test_loss', 'best_val_acc', 'epochs_run', 'train_seconds', 'num_params'):
            if key in results:
                assert acc.Scalars(f'~results/{key}')[-1].value == pytest.approx(results[key], rel=1e-6), (run_dir, key)
        # HParams metrics are a short headline (each a one-dot chart on TensorBoard's first screen);
        # every other result is in W&B's summary and the text tables (test_wandb_summary_and_config...)
        assert len([t for t in acc.Tags()['scalars'] if t.startswith('~results/')]) <= 8, run_dir
        [text] = acc.Tensors('config/text_summary')
        markdown = text.tensor_proto.string_val[0].decode()
        for k, v in config.items():
            assert f'| {k} | {json.dumps(v)} |' in markdown, (run_dir, k)


def test_tables_reach_tensorboard_as_text(runs):
    rd = runs['runs_dir']
    [text] = tensorboard(os.path.join(rd, 'exercise_1_2', 'study')).Tensors('study/text_summary')
    assert text.tensor_proto.string_val[0].decode().startswith('| model | depth | width |')
    [detect] = glob.glob(os.path.join(rd, 'exercise_2_2', 'detect-*'))
    events = tensorboard(detect)
    assert events.Tensors('tracks/text_summary') and events.Tensors('box_ablation/text_summary')
    # one-off results are HParams metrics and text, not one-dot scalar charts of their own (issue 21 part 8)
    assert all(tag.startswith('~results/') for tag in events.Tags()['scalars'])


# ---------------------------------------------------------------------------------------------
# Item 3: provenance

def git_head() -> str:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def test_provenance_in_every_results_json(runs):
    for run_dir in all_run_dirs(runs):
        prov = results_of(run_dir)['provenance']
        assert prov['git_commit'] == git_head() and isinstance(prov['git_dirty'], bool), run_dir
        assert prov['command'] == shlex.join(sys.orig_argv)  # in-process runs: pytest's own command line
        assert prov['python'] == '.'.join(map(str, sys.version_info[:3]))
        assert prov['torch'] and 'cuda' in prov and prov['device'] == 'cpu' and prov['device_count'] >= 1
        assert prov['device_name'] and prov['world_size'] == 1
        assert prov['started'] <= prov['ended'] and prov['ended'].endswith('Z')
        data = prov['data']
        if os.path.basename(os.path.dirname(run_dir)) != 'exercise_2_3':
            assert {'train', 'val', 'test'} <= set(data), run_dir
            assert all(data[s]['samples'] > 0 and len(data[s]['sha256']) == 16 for s in ('train', 'val', 'test'))
        else:
            assert data['cnn_setup']['test']['samples'] > 0
    # the same data gives the same fingerprint: 2.3 explained 1.3's test split
    [ex13] = glob.glob(os.path.join(runs['runs_dir'], 'exercise_1_3', 'tiny'))
    [cam] = glob.glob(os.path.join(runs['runs_dir'], 'exercise_2_3', 'cam-*'))
    assert results_of(cam)['provenance']['data']['cnn_setup']['test'] == results_of(ex13)['provenance']['data']['test']


def test_provenance_never_fails_without_git(tmp_path, monkeypatch):
    import provenance
    monkeypatch.setattr(provenance, 'REPO', str(tmp_path))  # not a checkout
    assert provenance.provenance()['git_commit'] == 'not a git checkout'
    monkeypatch.setenv('PATH', str(tmp_path))  # no git at all
    prov = provenance.provenance('cpu', 1, object(), 'then')
    assert prov['git_commit'] == 'git is not installed' and prov['git_dirty'] is None
    assert prov['data']['provenance_error'] and prov['started'] == 'then'  # a strange data object: said, not raised


def test_reevaluation_records_provenance(runs, monkeypatch):
    import evaluate
    [best] = glob.glob(os.path.join(runs['runs_dir'], 'exercise_1_1', 'mlp-*', 'checkpoints', 'best.pt'))
    monkeypatch.setattr(sys, 'orig_argv', ['python', 'evaluate.py', best])  # as if run from a shell
    evaluate.main([best])
    with open(best.replace('.pt', '.evaluation.json')) as f:
        record = json.load(f)
    results = results_of(os.path.dirname(os.path.dirname(best)))
    assert record['test_acc'] == pytest.approx(results['test_acc'])
    assert record['provenance']['command'] == f'python evaluate.py {best}'
    assert record['provenance']['data'] == results['provenance']['data']
    assert record['provenance']['git_commit'] == git_head()


# ---------------------------------------------------------------------------------------------
# Item 4: report.py

def test_report_writes_one_table_per_exercise_and_lists_unfinished_runs(runs, capsys):
    import report
    rd = runs['runs_dir']
    stopped = os.path.join(rd, 'exercise_1_1', 'stopped')  # a run that never finished
    os.makedirs(stopped, exist_ok=True)
    with open(os.path.join(stopped, 'config.json'), 'w') as f:
        json.dump({**config_of(glob.glob(os.path.join(rd, 'exercise_1_1', 'mlp-*'))[0]), 'lr': 0.5}, f)
    try:
        report.main([rd, '--plot'])
    finally:
        os.remove(os.path.join(stopped, 'config.json'))
        os.rmdir(stopped)
    printed = capsys.readouterr().out
    with open(os.path.join(rd, 'report.md')) as f:
        written = f.read()
    assert printed.startswith(written)
    sections = re.split(r'^## ', written, flags=re.M)[1:]
    assert [s.split('\n')[0] for s in sections] == ['exercise_1_1', 'exercise_1_2', 'exercise_1_3', 'exercise_2_2',
                                                    'exercise_2_3']
    tables = {s.split('\n')[0]: [line.strip('| ').split(' | ') for line in s.splitlines()
                                  if line.startswith('| ') and not line.startswith('| --- ')] for s in sections}
    head, *rows = tables['exercise_1_1']
    assert head == ['run', 'lr', 'test acc', 'best val acc (epoch)', 'epochs', 'time', 'device', 'commit']  # lr differs
    run_dir = glob.glob(os.path.join(rd, 'exercise_1_1', 'mlp-*'))[0]
    results = results_of(run_dir)
    mine = rows[[r[0] for r in rows].index(os.path.basename(run_dir))]
    assert mine[2] == f"{100 * results['test_acc']:.2f}%"
    assert mine[3] == f"{100 * results['best_val_acc']:.2f}% ({results['best_epoch']})"
    assert mine[4] == str(results['epochs_run']) and mine[5] == f"{results['train_seconds']:.0f} s"
    assert mine[6] == results['provenance']['device_name'] and mine[7].rstrip('+') == git_head()[:7]
    assert rows[[r[0] for r in rows].index('stopped')][1:3] == ['0.5', 'unfinished']
    head, *rows = tables['exercise_1_2']
    assert head[:2] == ['run', 'model'] and sorted(r[1] for r in rows) == ['plain', 'residual']  # depth is the same
    assert '1 finished, 1 unfinished.' in sections[0]
    for exercise in ('exercise_1_1', 'exercise_1_2', 'exercise_1_3', 'exercise_2_2'):  # runs with val/acc curves
        assert os.path.getsize(os.path.join(rd, f'report_{exercise}.png')) > 0
        assert f'](report_{exercise}.png)' in written
    assert not os.path.exists(os.path.join(rd, 'report_exercise_2_3.png'))  # 2.3 trains nothing: no curve


def test_report_record_copies_a_finished_run_only(runs, tmp_path):
    import report
    from config import UserError
    run_dir = glob.glob(os.path.join(runs['runs_dir'], 'exercise_1_3', 'tiny'))[0]
    target = report.record(run_dir, str(tmp_path / 'results'))
    assert target == str(tmp_path / 'results' / 'exercise_1_3' / 'tiny')
    assert sorted(os.listdir(target)) == ['config.json', 'results.json']
    assert results_of(target) == results_of(run_dir)
    with pytest.raises(UserError, match='never replaced silently'):
        report.record(run_dir, str(tmp_path / 'results'))
    os.makedirs(tmp_path / 'runs' / 'exercise_1_1' / 'half')
    with pytest.raises(UserError, match='only a finished run'):
        report.main(['--record', str(tmp_path / 'runs' / 'exercise_1_1' / 'half')])
    with pytest.raises(UserError, match='no runs under'):
        report.main([str(tmp_path / 'runs')])
