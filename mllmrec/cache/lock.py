"""An exclusive, inter-process file lock: ``with file_lock(path): ...``.

Built on ``fcntl.flock`` on a lock file that is created if needed and never deleted (deleting a
lock file while another process waits on it would let a third one lock a new inode). The lock is
released when the ``with`` block ends or when the process dies (the kernel drops it), so a killed
builder never leaves a stale lock behind. On Linux NFS (v4, or v3 with the NLM lock daemon)
``flock`` is emulated with whole-file POSIX locks and works across machines; a filesystem mounted
with ``nolock`` gives only per-machine locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """The lock was still held by another process after ``timeout`` seconds."""


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float | None = None, poll: float = 0.2,
              what: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the ``with`` block.

    ``timeout=None`` waits as long as it takes; otherwise :class:`LockTimeout` after ``timeout``
    seconds. When another process holds the lock, one INFO line says so (naming ``what``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, timeout, poll, what)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False


def _acquire(fd: int, path: Path, timeout: float | None, poll: float, what: str | None) -> None:
    if _try_lock(fd):
        return
    log.info("%s: another process holds %s; waiting for it", what or path.name, path)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if _try_lock(fd):
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(f"{what or path}: lock {path} still held by another process after {timeout:g}s")
        time.sleep(poll)
