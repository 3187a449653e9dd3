"""Atomic outputs (directories and single files): build in a hidden sibling, then rename into place in one step.

A crash or an error leaves either the previous directory or nothing, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import QForgeError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_new_output(path: str | Path, overwrite: bool = False) -> None:
    """Refuse an existing output unless `overwrite`: call it before long work, not only when writing."""
    if Path(path).exists() and not overwrite:
        raise QForgeError(f"{path} already exists; choose another --out or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    path = Path(path)
    check_new_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
