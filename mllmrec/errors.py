"""User-facing errors: one line, naming the file/field/row or the setting at fault."""

from __future__ import annotations

import functools
import logging
import sys


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's message on one line, at most ``limit`` characters (multi-line messages, such
    as Hydra's instantiation errors, keep their cause, which is on a later line)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return (text[:limit] + " ...") if len(text) > limit else (text or type(exc).__name__)


class MLLMRecError(Exception):
    """An error caused by the user's input or settings; reported as one line, no traceback."""


class DataError(MLLMRecError):
    """Bad input data. The message names the file, the column and the row (file line number)."""

    def __init__(self, path, message: str, column: str | None = None, line: int | None = None):
        where = str(path)
        if column is not None:
            where += f": column '{column}'"
        if line is not None:
            where += f", line {line}" if column is not None else f": line {line}"
        super().__init__(f"{where}: {message}")


class ConfigError(MLLMRecError):
    """A setting out of range, named by its config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config '{key}': {message}")


class DivergedError(MLLMRecError):
    """The model's scores are not finite (NaN or inf): training diverged or the model is broken."""


def report_errors(fn):
    """Decorator for entry points: MLLMRecError -> one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MLLMRecError as exc:
            logging.getLogger("mllmrec").debug("error", exc_info=True)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
