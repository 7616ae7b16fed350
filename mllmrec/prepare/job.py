"""One preparation's settings, checked, and its paths resolved, before any data is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mllmrec.errors import ConfigError, DataError
from mllmrec.prepare.split import SPLIT_RULES

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Job:
    """What to prepare: dataset ``name`` from the ``reviews`` (and ``meta``) files into ``dest``."""

    name: str
    reviews: Path
    meta: Path | None  # None: no meta-<name>.csv
    dest: Path  # resolved: a symlinked folder is built beside (and replaces) its target
    k: int
    split: str
    seed: int
    strict: bool


def _validate(name: str, k, rule: str) -> None:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ConfigError("dataset.name", f"must be a plain folder name (letters, digits, '.', '_', '-'), got {name!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("prepare.k", f"must be an integer >= 1, got {k!r}")
    if rule not in SPLIT_RULES:
        raise ConfigError("prepare.split", f"must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")


def check_job(
    name: str, reviews: str | Path, meta: str | Path | None, dest: str | Path, *, k, split: str, seed, strict: bool
) -> Job:
    """The :class:`Job`, or a one-line :class:`ConfigError` / :class:`DataError` (missing input file)."""
    _validate(name, k, split)
    dest = Path(dest).expanduser().resolve()
    reviews = Path(reviews).expanduser()
    meta = Path(meta).expanduser() if meta not in (None, "") else None
    if not reviews.is_file():
        raise DataError(reviews, "reviews file not found (set prepare.reviews)")
    if meta is not None and not meta.is_file():
        raise DataError(meta, "metadata file not found (set prepare.meta, or prepare.meta=null for none)")
    return Job(name, reviews, meta, dest, k, split, seed, strict)
