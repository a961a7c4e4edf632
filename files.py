"""Files written whole or not at all: atomic_write and the helpers built on it.

Every file a run writes goes through atomic_write (a temp file beside the target, fsync,
os.replace), and a write the disk refuses becomes one line naming the file (cannot_write).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from typing import IO, Any, Callable

from config import UserError

TEMP_FILE = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$')  # atomic_write's temp files: .<name>.XXXXXXXX.tmp


def atomic_write(path: str, write: Callable[[IO], Any], binary: bool = True) -> str:
    """write(f) into a temp file beside `path`, fsync, then os.replace: readers see the old file
    or the new one, never half of one. The temp file is removed if anything fails. Returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{secrets.token_hex(4)}.tmp')
    try:  # O_EXCL claims the name; mode 0o666 lets the umask decide, as a plain open() would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno:
            raise cannot_write(path, e) from None
        raise
    return path


def cannot_write(path: str, e: OSError) -> UserError:
    """The one line for a write the filesystem refused (ENOSPC, EFBIG, EROFS, EACCES...)."""
    return UserError(f"cannot write {path}: {e.strerror or e}")


def shown_path(path: str) -> str:
    """path relative to the working directory when it lies under it: console lines fit a screen."""
    return os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path


def write_json(path: str, obj: Any) -> str:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)


def copy_file(src: str, dst: str) -> str:
    with open(src, 'rb') as f:
        return atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as a PNG (atomically) and free it. Returns path."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120, bbox_inches='tight'))
    finally:
        plt.close(fig)
    return path
