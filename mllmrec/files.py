"""Atomic publication: a reader (or a crash) never sees half a file or half a folder.

One helper per shape of output, used by every writer in the house (cache artifacts, prepared
datasets, LLM parts, downloaded images, the converted test model, metrics, recommendations):

- :func:`atomic_file`: a context manager yielding a temporary path beside the target; on success
  it is renamed over the target, on failure removed;
- :func:`write_text_atomic`: the same for a string;
- :func:`publish_dir`: rename a complete temporary folder to its destination, swapping out (and
  then deleting) what was there, and putting it back if the rename fails;
- :func:`atomic_dir`: a context manager yielding a temporary folder that :func:`publish_dir`
  publishes on success and that is removed on failure.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name beside ``path`` (same file system, so a rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write tmp`` -> ``p`` appears whole or not at all."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_dir(tmp: Path, dest: Path, *, replace: bool = True) -> None:
    """Rename the complete folder ``tmp`` to ``dest``.

    ``replace``: an existing ``dest`` is first renamed aside, then deleted once ``tmp`` is in
    place (and renamed back if publishing fails). Without ``replace`` the rename fails with the
    OS error when ``dest`` exists (e.g. a concurrent identical build), leaving ``tmp`` in place.
    An empty ``dest`` folder is always replaced.
    """
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    elif replace and (dest.exists() or dest.is_symlink()):
        old = temp_sibling(dest, "old")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_dir(dest: Path, *, replace: bool = True) -> Iterator[Path]:
    """``with atomic_dir(d) as tmp: fill tmp`` -> ``d`` appears complete or not at all."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, dest, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
