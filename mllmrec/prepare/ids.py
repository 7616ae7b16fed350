"""Contiguous ids (0..n-1 in sorted order of the original ids) and the canonical row order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mllmrec.prepare.reviews import Reviews


@dataclass
class Interactions:
    """The kept interactions with contiguous ids, rows ordered by (user, time, item)."""

    users: np.ndarray  # int64 userID
    items: np.ndarray  # int64 itemID
    ratings: np.ndarray  # float32
    times: np.ndarray  # int64
    user_names: list[str]  # original user id of each userID
    item_names: list[str]  # asin of each itemID

    def frame(self, labels: np.ndarray) -> pd.DataFrame:
        """The ``.inter`` table: userID, itemID, rating, timestamp, x_label (``labels``)."""
        return pd.DataFrame({
            "userID": self.users, "itemID": self.items, "rating": self.ratings.astype(np.float64),
            "timestamp": self.times, "x_label": labels,
        })


def sorted_ids(codes: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Map the distinct ``codes`` to ids 0..n-1 in sorted order of their original names.

    Returns (lookup from code to new id, -1 for absent codes; the names in new-id order)."""
    present = np.unique(codes)
    labels = [names[c] for c in present]
    order = sorted(range(len(labels)), key=labels.__getitem__)
    lookup = np.full(len(names), -1, np.int64)
    lookup[present[order]] = np.arange(len(order))
    return lookup, [labels[j] for j in order]


def renumber(kept: Reviews) -> Interactions:
    """``kept`` with contiguous user and item ids, in the canonical row order (user, time, item)."""
    user_lookup, user_names = sorted_ids(kept.users, kept.user_ids)
    item_lookup, item_names = sorted_ids(kept.items, kept.item_ids)
    users, items = user_lookup[kept.users], item_lookup[kept.items]
    order = np.lexsort((items, kept.times, users))
    return Interactions(users[order], items[order], kept.ratings[order], kept.times[order], user_names, item_names)
