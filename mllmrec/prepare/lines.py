"""Reading raw dump files line by line: plain or gzip, with a progress bar and a malformed-line report."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from mllmrec.errors import DataError, one_line

log = logging.getLogger(__name__)

MAX_WARNINGS = 10  # malformed lines reported one by one per file; the rest are only counted
_GZIP_MAGIC = b"\x1f\x8b"


def iter_lines(path: Path, desc: str, progress: bool = True) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a plain or gzip file (detected by its magic bytes).

    A progress bar counts the bytes read from disk (compressed bytes for a ``.gz``). A file that
    cannot be read (truncated or corrupt gzip) raises :class:`DataError` naming the line reached.
    """
    path = Path(path)
    size = path.stat().st_size
    lineno = 0
    with open(path, "rb") as raw, tqdm(
        total=size, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, leave=False
    ) as bar:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        done = 0
        try:
            for lineno, line in enumerate(stream, 1):
                yield lineno, line
                if not lineno & 0x3FFF:
                    pos = raw.tell()
                    bar.update(pos - done)
                    done = pos
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(path, f"cannot be read past this point: {one_line(exc, 200)}", line=lineno + 1) from None
        bar.update(size - done)


class Malformed:
    """Reports malformed lines of one file: a warning per line (the first few), fatal when strict."""

    def __init__(self, path: Path, kind: str, strict: bool):
        self.path, self.kind, self.strict = path, kind, strict
        self.count = 0
        self.first_lines: list[int] = []

    def __call__(self, lineno: int, reason: str) -> None:
        if self.strict:
            raise DataError(self.path, f"malformed {self.kind} line: {reason} (prepare.strict=true)", line=lineno)
        self.count += 1
        if self.count <= MAX_WARNINGS:
            self.first_lines.append(lineno)
            log.warning("%s: line %d: malformed %s line skipped: %s", self.path, lineno, self.kind, reason)
            if self.count == MAX_WARNINGS:
                log.warning("%s: further malformed %s lines are skipped and counted, not shown", self.path, self.kind)
