"""MMRec's per-user train / validation / test split (``x_label`` 0 / 1 / 2)."""

from __future__ import annotations

import numpy as np

from mllmrec.data import TEST, TRAIN, VALID
from mllmrec.errors import ConfigError

SPLIT_RULES = ("random", "chronological")


def split_labels(users: np.ndarray, times: np.ndarray, *, rule: str = "random", seed: int = 999) -> np.ndarray:
    """x_label per interaction with MMRec's per-user rule.

    Each user's interactions are ordered (``random``: a seeded shuffle; ``chronological``: by
    time, ties in row order); with n of them, the last ``h`` are held out, where h = 2 when
    n < 10 and int(0.2 n) otherwise (never more than n - 1, so a user keeps a training item);
    the first floor(h / 2) held-out ones are validation (1), the rest test (2), the others train (0).
    The result depends only on the rows given (in that order) and the seed.
    """
    if rule not in SPLIT_RULES:
        raise ConfigError("prepare.split", f"must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")
    n = len(users)
    rows = np.arange(n)
    if rule == "random":
        key = np.random.default_rng(int(seed)).permutation(n)
    else:
        key = np.asarray(times)
    order = np.lexsort((rows, key, users))
    counts = np.bincount(users, minlength=int(users.max()) + 1 if n else 0)
    starts = np.cumsum(counts) - counts
    rank = np.empty(n, np.int64)
    rank[order] = rows - np.repeat(starts, counts)
    held = np.where(counts < 10, 2, counts // 5)  # counts // 5 == int(0.2 * counts) for integers
    held = np.minimum(held, np.maximum(counts - 1, 0))
    n_train = (counts - held)[users]
    n_valid = (held // 2)[users]
    labels = np.full(n, TRAIN, np.int8)
    labels[rank >= n_train] = VALID
    labels[rank >= n_train + n_valid] = TEST
    return labels
