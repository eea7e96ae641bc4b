"""Write a stage's output folder under a temporary name and publish it in one rename.

An interrupted run (exception, Ctrl-C, or a killed process) must never leave a folder that
looks finished: downstream stages and DVC trust whatever sits at the output path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_TMP_TAG = ".tmp-"


def _staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{_TMP_TAG}*"))


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of ``out``; on success it replaces ``out`` atomically.

    Leftovers of earlier killed runs are removed first. On any failure the staging folder is
    deleted and ``out`` is left exactly as it was.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _staging_dirs(out):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}{_TMP_TAG}old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
