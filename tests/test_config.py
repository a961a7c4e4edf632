import os

import pytest

from config import COMMON, UserError, cli, parse_args

DEFAULTS = {**COMMON, 'hidden': [64, 64], 'dropout': 0.0}


@pytest.mark.parametrize('argv, expected', [
    (['--lr', '3e-4'], {'lr': 3e-4}),
    (['--lr=0.1', '--epochs=7'], {'lr': 0.1, 'epochs': 7}),
    (['--lr', '1'], {'lr': 1.0}),                              # int literal accepted for a float key
    (['--hidden', '[512, 256]'], {'hidden': [512, 256]}),
    (['--hidden=(8,)'], {'hidden': [8]}),                      # tuple literal becomes the list it stands for
    (['--optimizer', 'sgd'], {'optimizer': 'sgd'}),            # bare word is a string
    (['--amp', 'off', '--compile', 'True'], {'amp': 'off', 'compile': True}),
    (['--run_name', '2024'], {'run_name': '2024'}),            # a string key takes the text as given
    (['--resume', 'runs/x/checkpoints/last.pt'], {'resume': 'runs/x/checkpoints/last.pt'}),
])
def test_overrides_parse_as_python_literals(argv, expected):
    overrides = parse_args(DEFAULTS, argv)
    assert overrides == expected
    assert all(type(v) is type(DEFAULTS[k]) for k, v in overrides.items())


@pytest.mark.parametrize('argv, message', [
    (['--lrr', '0.1'], "unknown config key 'lrr'"),
    (['--epochs', '2.5'], '--epochs expects an int'),
    (['--hidden', '512'], '--hidden expects a list'),
    (['--compile', 'yes'], '--compile expects a bool'),
    (['--epochs'], '--epochs needs a value'),
    (['epochs=3'], 'unexpected argument'),
])
def test_bad_overrides_name_the_key(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(DEFAULTS, argv)


def test_cli_exits_2_on_bad_key_without_calling_main(capsys):
    called = []
    with pytest.raises(SystemExit) as exit_info:
        cli(lambda c, o: called.append(c), DEFAULTS, ['--bogus', '1'])
    assert exit_info.value.code == 2 and not called
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown config key 'bogus' (see --help)"


def test_cli_passes_merged_config_and_overrides():
    seen = {}
    cli(lambda c, o: seen.update(config=c, overrides=o), DEFAULTS, ['--epochs', '3'])
    assert seen['overrides'] == {'epochs': 3}
    assert seen['config'] == {**DEFAULTS, 'epochs': 3}


def test_cli_turns_user_errors_into_exit_1(capsys):
    def main(config, overrides):
        raise UserError('data missing in ./data/MNIST/raw')
    with pytest.raises(SystemExit) as exit_info:
        cli(main, DEFAULTS, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == 'error: data missing in ./data/MNIST/raw\n'


def test_script_cli_errors_exit_2_with_one_line_and_write_nothing(run_script, tmp_path):
    runs = tmp_path / 'runs'
    for args in (['--lr', 'fast'], ['--not_a_key', '1'], ['--hidden', '7']):
        result = run_script('exercise_1_1.py', '--runs_dir', str(runs), *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr
        assert not runs.exists()


def test_help_lists_every_key_with_default_and_comment(run_script):
    result = run_script('exercise_1_1.py', '--help')
    assert result.returncode == 0
    from exercise_1_1 import config
    for key in config:
        assert f'--{key} ' in result.stdout
    line = next(l for l in result.stdout.splitlines() if '--hidden ' in l)
    assert '[1024, 1024]' in line and 'hidden layer widths' in line  # the comment from the script
    line = next(l for l in result.stdout.splitlines() if '--val_split ' in l)
    assert 'model selection' in line                                 # a comment from config.COMMON


def test_data_dir_default_follows_environment(run_script):
    result = run_script('-c', 'from config import COMMON; print(COMMON["data_dir"])', env={'DLA_DATA': '/x/y'})
    assert result.stdout.strip() == '/x/y'
    assert os.environ.get('DLA_DATA') or COMMON['data_dir'] == './data'
