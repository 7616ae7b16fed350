"""Iterative k-core: users and items keep at least k interactions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mllmrec.errors import DataError
from mllmrec.prepare.reviews import Reviews


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core: drop users and items with fewer than ``k`` interactions until stable.

    Returns the mask of the kept interactions and the number of passes made."""
    mask = np.ones(len(users), bool)
    n_users = int(users.max()) + 1 if len(users) else 0
    n_items = int(items.max()) + 1 if len(items) else 0
    passes = 0
    while True:
        passes += 1
        u_count = np.bincount(users[mask], minlength=n_users)
        i_count = np.bincount(items[mask], minlength=n_items)
        new = mask & (u_count[users] >= k) & (i_count[items] >= k)
        if new.sum() == mask.sum():
            return mask, passes
        mask = new


def apply_kcore(reviews: Reviews, k: int, source: Path) -> tuple[Reviews, dict]:
    """The reviews in the ``k``-core, and the counts ``before_kcore`` and ``kcore_passes``.

    Raises :class:`DataError` (about ``source``, the reviews file) when nothing is left."""
    before = {
        "users": int(len(np.unique(reviews.users))),
        "items": int(len(np.unique(reviews.items))),
        "interactions": len(reviews),
    }
    mask, passes = kcore_mask(reviews.users, reviews.items, k)
    kept = reviews.take(np.flatnonzero(mask))
    if len(kept) == 0:
        raise DataError(
            source, f"no interactions left after the {k}-core filter ({before['interactions']} user-item pairs read)"
        )
    return kept, {"before_kcore": before, "kcore_passes": passes}
