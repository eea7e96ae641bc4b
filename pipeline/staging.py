"""Publish outputs so that a reader never sees a half-written one and nothing is lost.

Every output (a file, a stage's folder, a feature store) is written under a temporary
sibling name and then put in place by one rename. A folder that replaces an existing one
is **swapped** with it in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
``renamex_np(RENAME_SWAP)``), so at every instant the path holds either the complete old
output or the complete new one, even if the process is killed. Where the file system cannot
swap, the old folder is moved to a recovery name first and put back by the next run if the
process died before the new one was in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def _swap_function():
    """The C call that exchanges two paths atomically, as ``f(a, b) -> errno``, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        call = libc.renameat2
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        return lambda a, b: 0 if call(at_fdcwd, a, at_fdcwd, b, rename_exchange) == 0 \
            else ctypes.get_errno()
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = libc.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_swap = 2
        return lambda a, b: 0 if call(a, b, rename_swap) == 0 else ctypes.get_errno()
    return None


_SWAP = _swap_function()


def swap_paths(a: Path, b: Path) -> bool:
    """Exchange two existing paths in one atomic step; False where the file system can't."""
    if _SWAP is None:
        return False
    err = _SWAP(os.fsencode(a), os.fsencode(b))
    if err == 0:
        return True
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _siblings(out: Path, tag: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{tag}*"))


def recover(out: Path) -> None:
    """Put back an old output that a killed run had moved aside (only the no-swap path can)."""
    out = Path(out).absolute()
    aside = _siblings(out, _OLD_TAG)
    if aside and not out.exists():
        os.replace(aside[-1], out)
        aside = aside[:-1]
    for stale in aside:
        shutil.rmtree(stale, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Make folder ``new`` the folder ``out``; the old ``out`` stays whole until it is gone."""
    new, out = Path(new).absolute(), Path(out).absolute()
    recover(out)
    if not out.exists():
        os.replace(new, out)
        return
    if swap_paths(new, out):
        shutil.rmtree(new, ignore_errors=True)  # holds the old output now
        return
    aside = out.parent / f".{out.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}"
    os.replace(out, aside)
    os.replace(new, out)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of ``out``; on success it replaces ``out`` atomically.

    Leftovers of earlier killed runs are cleared first (an old output they had moved aside is
    restored). On any failure the staging folder is deleted and ``out`` is left as it was.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    for stale in _siblings(out, _TMP_TAG):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


@contextlib.contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it becomes ``out`` in one rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _siblings(out, _TMP_TAG):
        stale.unlink(missing_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
