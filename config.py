"""Config and command line, shared by every exercise script.

An exercise builds its `config` dict as `{**COMMON, ...its own keys...}`. Every key can be
overridden from the command line under the same name (`--lr 3e-4`, `--hidden=[512,256]`);
values are Python literals, type-checked against the default. `--help` lists each key with
its default and the comment written next to it in the source. Bad input ends the program
with one line on stderr and exit code 2, before anything is written. ROLE says what each key is
(where it runs, what it trains on, ...); resume rules and run identities are derived from it.
"""
from __future__ import annotations

import ast
import errno
import inspect
import netrc
import os
import re
import sys
from typing import Any, Callable, Iterable


def plural(n: int, word: str) -> str:
    """'1 epoch', '3 epochs'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


class UserError(Exception):
    """Something the user can fix (bad data dir, corrupt checkpoint...): one line, no traceback."""


def wandb_default() -> str:
    """'online' when the user can reach W&B (API key or netrc login), else 'offline'."""
    if os.environ.get('WANDB_API_KEY'):
        return 'online'
    try:
        return 'online' if netrc.netrc().authenticators('api.wandb.ai') else 'offline'
    except (OSError, netrc.NetrcParseError):
        return 'offline'


COMMON: dict[str, Any] = {
    # data
    'dataset': 'mnist',                             # mnist | fashion_mnist | digits | cifar10
    'data_dir': os.environ.get('DLA_DATA', './data'),  # torchvision layout; env DLA_DATA overrides
    'val_split': 0.1,                               # fraction of train held out for model selection
    'subset': 0,                                    # use at most this many samples per split (0 = all)
    # optimisation
    'epochs': 10,                                   # passes over the training split
    'batch_size': 128,                              # samples per optimizer step
    'optimizer': 'adamw',                           # adam | adamw | sgd (sgd uses Nesterov momentum)
    'lr': 1e-3,                                     # peak learning rate
    'momentum': 0.9,                                # sgd only
    'weight_decay': 0.0,                            # decoupled for adamw, L2 for adam/sgd
    'scheduler': 'cosine',                          # none | cosine | onecycle (stepped per batch)
    'label_smoothing': 0.0,                         # cross-entropy target smoothing
    # system
    'device': 'auto',                               # auto = cuda, then mps, then cpu
    'seed': 0,                                      # model init, shuffling, dropout
    'amp': 'auto',                                  # bf16 autocast: auto (on CUDA only) | on (CUDA or CPU) | off
    'channels_last': 'auto',                        # NHWC for conv nets: auto (on CUDA only) | on | off
    'compile': False,                               # torch.compile the model (worth it on CUDA)
    'sync_bn': False,                               # under torchrun on CUDA: BatchNorm statistics over all GPUs
    'max_steps': 0,                                 # cap on optimizer steps per epoch (0 = none); smoke runs
    # runs and logging
    'runs_dir': './runs',                           # a run writes runs/<exercise>/<run_name>/
    'run_name': '',                                 # '' = <model>-<dataset>-<timestamp>
    'resume': '',                                   # '' | path to a checkpoint | auto (newest unfinished run of this name)
    'overwrite': False,                             # let a fresh run replace an existing run_name's directory
    'wandb': wandb_default(),                       # online | offline | off; default: online if logged in, else offline (kept in the run folder for `wandb sync`)
    'wandb_project': 'dla-labs',                    # W&B project; runs are grouped by exercise
    'wandb_verbose': False,                         # show W&B's own console output (else one line of ours)
}

# Allowed values of the COMMON keys that take a word; a script adds its own (dataset, part...).
CHOICES: dict[str, tuple] = {
    'optimizer': ('adam', 'adamw', 'sgd'),
    'scheduler': ('none', 'cosine', 'onecycle'),
    'amp': ('auto', 'on', 'off'),
    'channels_last': ('auto', 'on', 'off'),
    'wandb': ('online', 'offline', 'off'),
}

# What each key is: the one declaration behind the resume rules (record.Run), a study cell's identity
# (study.cell_id), 2.2's stage identities and what 2.3 hands on to 1.3 (docs/usage.md, "What a key is").
# A script declares its own keys' roles in its own ROLE dict; a key declared nowhere is RESULT.
RUNS = 'runs'            # where and how it runs and logs: never part of what it computes
THIS_RUN = 'this_run'    # names, claims or resumes this run's folder
DATA = 'data'            # what it learns from: which data, how much of it, the seed of every random draw
RECIPE = 'recipe'        # how it is optimised: shapes the result
SCHEDULE = 'schedule'    # how long: shapes the result, yet a resume may lengthen it (training.train checks)
RESULT = 'result'        # shapes the result (a script's model keys; the default)
CHOOSES = 'chooses'      # picks what a script runs (which parts, which depths), not what any one run computes
STUDY = 'study'          # shapes a script's study cells only, not its single run
AFTER = 'after'          # read only after training (decoding, scoring, figures)

ROLE: dict[str, str] = {
    **dict.fromkeys(('device', 'amp', 'channels_last', 'compile', 'data_dir', 'runs_dir', 'wandb', 'wandb_project',
                     'wandb_verbose'), RUNS),
    **dict.fromkeys(('run_name', 'resume', 'overwrite'), THIS_RUN),
    **dict.fromkeys(('dataset', 'subset', 'seed', 'max_steps'), DATA),
    **dict.fromkeys(('val_split', 'batch_size', 'optimizer', 'lr', 'momentum', 'weight_decay', 'scheduler',
                     'label_smoothing', 'sync_bn'), RECIPE),
    'epochs': SCHEDULE,
    # the depth studies' keys (1.2, 1.3, 2.1), declared here because study.cell_id reads only this table
    'part': CHOOSES, 'depths': CHOOSES,
}


def keys_with(keys: Iterable[str], *roles: str, declared: dict[str, str] | None = None) -> tuple[str, ...]:
    """Those of `keys` (in their order) whose role is one of `roles`: the script's `declared` role,
    else ROLE's, else RESULT."""
    declared = declared or {}
    return tuple(k for k in keys if declared.get(k, ROLE.get(k, RESULT)) in roles)


# Where and how a run runs, and its folder: a resumed run, study cell or 2.2 stage takes these from
# the command that resumes it, not from its checkpoint.
HOW_IT_RUNS = set(keys_with(ROLE, RUNS, THIS_RUN))
# Keys a resumed run may take from the command line although its checkpoint says otherwise; any other
# change is refused: the checkpoint's optimizer, scheduler and model were built from the old values.
# A script adds its own CHOOSES and STUDY keys (resume_may_change).
MAY_CHANGE_ON_RESUME = set(keys_with(ROLE, RUNS, THIS_RUN, SCHEDULE))
# Keys left out of a study cell's identity: every other key shapes the cell's result.
NOT_IDENTITY = set(keys_with(ROLE, RUNS, THIS_RUN, CHOOSES))


def resume_may_change(config: dict[str, Any], declared: dict[str, str]) -> tuple[str, ...]:
    """The script's keys a resumed single run may change besides MAY_CHANGE_ON_RESUME: those that pick
    what runs or shape only the study cells."""
    return keys_with(config, CHOOSES, STUDY, declared=declared)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The values that shape what a run computes (all but NOT_IDENTITY): a cached run's identity."""
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


# What a full, read-only or forbidden disk says: one line naming the file (docs/usage.md, "Run folders")
DISK_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}

_COMMENT = re.compile(r"""^\s*['"](\w+)['"]\s*:.*#\s*(.*)$""")


def _comments(*sources: str) -> dict[str, str]:
    """The `# comment` written after each `'key': value,` line in the given source files."""
    found = {}
    for path in sources:
        try:
            lines = open(path, encoding='utf-8').read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = _COMMENT.match(line)
            if m:
                found[m.group(1)] = m.group(2).strip()
    return found


def _parse_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, str):
        return text  # a string key takes the text as given: `--run_name 2024` is the name '2024'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as `--optimizer sgd` is a string
    if isinstance(default, bool) and isinstance(text, str) and text.lower() in ('true', 'false'):
        value = text.lower() == 'true'
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, list) and isinstance(value, tuple):
        value = list(value)
    if type(value) is not type(default):
        kind = type(default).__name__
        # the shell splits an unquoted `--hidden [512, 256]` into '[512,' and '256]'
        hint = f"; quote list values: --{key} '{default!r}'" if isinstance(default, list) and text.startswith('[') else ''
        raise UserError(f"--{key} expects {'an' if kind[0] in 'aeiou' else 'a'} {kind} like {default!r}, got {text!r}"
                        f"{hint}")
    return value


# (key, test, what the value must be): checked on the merged config before anything runs
LIMITS = [
    ('val_split', lambda v: 0 < v < 1, 'between 0 and 1, exclusive'),
    ('subset', lambda v: v >= 0, '>= 0 (0 = all)'),
    ('epochs', lambda v: v >= 1, '>= 1'),
    ('batch_size', lambda v: v >= 1, '>= 1'),
    ('lr', lambda v: v > 0, '> 0'),
    ('momentum', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('weight_decay', lambda v: v >= 0, '>= 0'),
    ('label_smoothing', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('max_steps', lambda v: v >= 0, '>= 0 (0 = no cap)'),
    ('runs_dir', lambda v: v != '' and '\0' not in v, 'a folder'),
]


def check_run_name(name: str) -> None:
    """A run name is one plain folder name under <runs_dir>/<exercise>/ (docs/usage.md, "Run folders"): no
    separator, no control character, not empty, not '.' or '..'. A leading '.' is refused too (hidden
    folders are the engine's own: a replaced run kept aside), and a leading '-' (it reads as an option)."""
    if (name in ('', '.', '..') or name[0] in '.-' or any(c in name for c in '/\\') or
            any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode()) > 255):
        raise UserError(f"--run_name {name!r} is not a plain folder name: one path component, no '/' or '\\', "
                        f"no control characters, not starting with '.' or '-'")


def check(config: dict[str, Any], choices: dict[str, tuple] | None = None, limits: list[tuple] = ()) -> None:
    """Values out of range or outside their choices -> UserError naming the key. `limits` adds a
    script's own (key, test, what) rows to LIMITS."""
    for key, ok, what in [*LIMITS, *limits]:
        if key in config and not ok(config[key]):
            raise UserError(f"--{key} must be {what}, got {config[key]!r}")
    for key, allowed in {**CHOICES, **(choices or {})}.items():
        if key in config and config[key] not in allowed:
            raise UserError(f"--{key} {config[key]!r} is not one of {', '.join(map(str, allowed))}")
    if config.get('run_name'):  # '' = the default name, checked by record.Run once it is made
        check_run_name(config['run_name'])


def parse_args(config: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The overrides given in argv, checked against config. Raises UserError on bad input."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            raise UserError(f"unexpected argument {arg!r}; options look like --key value")
        key, eq, text = arg[2:].partition('=')
        if key not in config:
            raise UserError(f"unknown config key {key!r} (see --help)")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"--{key} needs a value")
            i += 1
            text = argv[i]
        overrides[key] = _parse_value(key, text, config[key])
        i += 1
    return overrides


def help_text(config: dict[str, Any], script: str) -> str:
    notes = _comments(__file__, script)
    width = max(map(len, config))
    rows = [f"  --{k:<{width}}  {v!r:<24} {notes.get(k, '')}" for k, v in config.items()]
    return f"usage: python {os.path.basename(script)} [--key value ...]\n\n" + "\n".join(rows)


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """main(argv) for the scripts that take paths, not config keys (evaluate.py, report.py): a
    UserError is one line on stderr and exit code 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def cli(main: Callable[[dict[str, Any], dict[str, Any]], Any], config: dict[str, Any],
        argv: list[str] | None = None, choices: dict[str, tuple] | None = None) -> None:
    """Parse argv against config, check() the result, and call main(config, overrides).
    `choices` adds the script's own allowed values (e.g. the datasets it supports).

    Exit codes: 2 for a bad command line, 1 for other user errors (missing data, corrupt
    checkpoint), 128 + the signal (130 Ctrl-C, 143 SIGTERM) after an interrupted run that saved a checkpoint.
    """
    argv = sys.argv[1:] if argv is None else argv
    script = inspect.getsourcefile(main) or sys.argv[0]
    if '-h' in argv or '--help' in argv:
        print(help_text(config, script))
        sys.exit(0)
    try:
        overrides = parse_args(config, argv)
        check({**config, **overrides}, choices)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        main({**config, **overrides}, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a file or folder the disk refused outside files.atomic_write (command.txt...)
        if e.errno not in DISK_FAULTS:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        sys.exit(1)
    from device import leave_group  # under torchrun: every rank got here; leave together, not at teardown
    leave_group()
