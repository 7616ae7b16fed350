"""First pass: the reviews file -> compact (user, item, rating, time) arrays, one review per pair."""

from __future__ import annotations

import json
import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mllmrec.errors import DataError, one_line
from mllmrec.prepare.lines import Malformed, iter_lines

log = logging.getLogger(__name__)


@dataclass
class Reviews:
    """Interactions read from a reviews file, in file order; users/items are codes into the id lists."""

    users: np.ndarray  # int32 codes into user_ids
    items: np.ndarray  # int32 codes into item_ids
    ratings: np.ndarray  # float32
    times: np.ndarray  # int64, unixReviewTime
    user_ids: list[str]
    item_ids: list[str]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    def take(self, index: np.ndarray) -> "Reviews":
        return Reviews(
            self.users[index], self.items[index], self.ratings[index], self.times[index],
            self.user_ids, self.item_ids, dict(self.stats),
        )


def _review_fields(record) -> tuple[str, str, float, int]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("reviewerID", "asin", "overall", "unixReviewTime") if record.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    user, item = record["reviewerID"], record["asin"]
    if not isinstance(user, str) or not isinstance(item, str):
        raise ValueError("reviewerID and asin must be strings")
    rating = float(record["overall"])
    stamp = record["unixReviewTime"]
    if isinstance(stamp, bool) or not float(stamp).is_integer():
        raise ValueError(f"unixReviewTime must be an integer, got {stamp!r}")
    if not np.isfinite(rating):
        raise ValueError(f"overall must be a finite number, got {record['overall']!r}")
    return user.strip(), item.strip(), rating, int(stamp)


def read_reviews(path: str | Path, *, strict: bool = False, progress: bool = True) -> Reviews:
    """Stream a reviews file into compact arrays; malformed lines are warned about and skipped
    (fatal with ``strict``). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "reviews file not found (set prepare.reviews)")
    users, items = array("i"), array("i")
    ratings, times = array("f"), array("q")
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    malformed = Malformed(path, "review", strict)
    n_lines = blank = 0
    for lineno, line in iter_lines(path, f"reviews {path.name}", progress):
        n_lines = lineno
        if not line.strip():
            blank += 1
            continue
        try:
            user, item, rating, stamp = _review_fields(json.loads(line))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # JSON/Unicode errors are ValueErrors
            malformed(lineno, one_line(exc, 200))
            continue
        u = user_index.get(user)
        if u is None:
            u = user_index[user] = len(user_index)
        i = item_index.get(item)
        if i is None:
            i = item_index[item] = len(item_index)
        users.append(u)
        items.append(i)
        ratings.append(rating)
        times.append(stamp)
    if not users:
        raise DataError(path, f"no valid review lines ({n_lines} lines read, {malformed.count} malformed)")
    stats = {
        "review_lines": n_lines,
        "review_blank_lines": blank,
        "review_malformed_lines": malformed.count,
        "review_malformed_first_lines": malformed.first_lines,
        "reviews_read": len(users),
    }
    return Reviews(
        np.frombuffer(users, np.int32).copy(),
        np.frombuffer(items, np.int32).copy(),
        np.frombuffer(ratings, np.float32).copy(),
        np.frombuffer(times, np.int64).copy(),
        list(user_index),
        list(item_index),
        stats,
    )


def collapse_duplicates(reviews: Reviews) -> tuple[Reviews, int]:
    """Keep one review per (user, item): the latest (largest time; ties: the last in the file).
    The survivors stay in file order."""
    n = len(reviews)
    key = reviews.users.astype(np.int64) * max(1, len(reviews.item_ids)) + reviews.items
    order = np.lexsort((np.arange(n), reviews.times, key))
    sorted_key = key[order]
    last = np.ones(n, bool)
    last[:-1] = sorted_key[1:] != sorted_key[:-1]
    keep = np.sort(order[last])
    return (reviews.take(keep) if len(keep) < n else reviews), n - len(keep)


def load_reviews(path: Path, *, strict: bool, progress: bool) -> tuple[Reviews, int]:
    """The reviews of ``path`` with duplicates collapsed, and how many were collapsed (both logged)."""
    raw = read_reviews(path, strict=strict, progress=progress)
    log.info("%s: %d reviews of %d users and %d items read", path, len(raw), len(raw.user_ids), len(raw.item_ids))
    deduped, n_dup = collapse_duplicates(raw)
    if n_dup:
        log.info("%d duplicate (user, item) reviews collapsed to the latest one", n_dup)
    return deduped, n_dup
