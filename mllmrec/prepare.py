"""Raw Amazon 2014 reviews + metadata -> an MMRec-format dataset folder (``python -m stages.prepare``).

Input (McAuley's Amazon 2014 dumps, plain or gzip-compressed):

- reviews: JSON lines with ``reviewerID``, ``asin``, ``overall`` (rating), ``unixReviewTime``;
- metadata: one *Python literal* dict per line (``{'asin': ..., 'title': ..., 'categories': [[...]]}``),
  parsed with :func:`ast.literal_eval` (never ``eval``).

Steps: stream the reviews into compact arrays (only (user, item, rating, time) per line is kept),
collapse duplicate (user, item) pairs to the latest review, iterative k-core, contiguous ids in
sorted order of the original ids, MMRec's per-user split (or a chronological one), then a second,
streamed pass over the metadata that parses only the lines of items that survived the k-core.

Output (built in a temporary folder beside the destination and renamed into place when complete):
``<name>.inter`` (userID, itemID, rating, timestamp, x_label; tab-separated), ``meta-<name>.csv``
(itemID, asin, title, brand, categories, description, imUrl), ``i_id_mapping.csv`` (asin, itemID),
``u_id_mapping.csv`` (user_id, userID), both tab-separated, and ``prepare_report.json``.

Every function here works without Hydra; ``stages/prepare.py`` is the command-line wrapper.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from mllmrec.data import TEST, TRAIN, VALID, flatten_categories
from mllmrec.errors import ConfigError, DataError, one_line

log = logging.getLogger(__name__)

SPLIT_RULES = ("random", "chronological")
META_COLUMNS = ("title", "brand", "categories", "description", "imUrl")
REPORT = "prepare_report.json"
MAX_WARNINGS = 10  # malformed lines reported one by one per file; the rest are only counted
_GZIP_MAGIC = b"\x1f\x8b"
# Cheap look-up of a metadata line's asin, so that lines of items dropped by the k-core are
# skipped without being parsed. A line where it finds nothing is parsed in full.
_ASIN_RE = re.compile(rb"""['"]asin['"]\s*:\s*(?:'([^'\\]*)'|"([^"\\]*)")""")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ---------------------------------------------------------------- reading


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


class _Malformed:
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
    malformed = _Malformed(path, "review", strict)
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


# ---------------------------------------------------------------- filtering and ids


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


def sorted_ids(codes: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Map the distinct ``codes`` to ids 0..n-1 in sorted order of their original names.

    Returns (lookup from code to new id, -1 for absent codes; the names in new-id order)."""
    present = np.unique(codes)
    labels = [names[c] for c in present]
    order = sorted(range(len(labels)), key=labels.__getitem__)
    lookup = np.full(len(names), -1, np.int64)
    lookup[present[order]] = np.arange(len(order))
    return lookup, [labels[j] for j in order]


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


# ---------------------------------------------------------------- metadata


def clean_text(value) -> str:
    """A metadata value as one line of readable text: HTML entities unescaped, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v) for v in value)
    return " ".join(html.unescape(str(value)).split())


def meta_fields(record: dict) -> dict[str, str]:
    """The text fields kept from one metadata record (missing ones empty)."""
    cats = record.get("categories")
    categories = flatten_categories(repr(cats)) if isinstance(cats, (list, tuple)) else str(cats or "")
    return {
        "title": clean_text(record.get("title")),
        "brand": clean_text(record.get("brand")),
        "categories": clean_text(categories),
        "description": clean_text(record.get("description")),
        "imUrl": str(record.get("imUrl") or "").strip(),
    }


def _meta_record(text: str):
    """A Python-literal line (``ast.literal_eval``, never ``eval``); a strict-JSON line (``null``,
    ``true``) also passes. Raises the literal parser's error when neither applies."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        if text.startswith("{"):
            try:
                return json.loads(text)
            except ValueError:
                pass
        raise exc


def read_metadata(
    path: str | Path, wanted: dict[str, int], *, strict: bool = False, progress: bool = True
) -> tuple[dict[int, dict[str, str]], dict]:
    """Second pass: the fields of the items in ``wanted`` (asin -> itemID), streamed.

    Lines of other items are skipped without being parsed. A malformed line is warned about and
    skipped (fatal with ``strict``); for an asin listed twice the first line is kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "metadata file not found (set prepare.meta)")
    found: dict[int, dict[str, str]] = {}
    malformed = _Malformed(path, "metadata", strict)
    n_lines = duplicates = skipped = 0
    for lineno, line in iter_lines(path, f"metadata {path.name}", progress):
        n_lines = lineno
        if not line.strip():
            continue
        hit = _ASIN_RE.search(line)
        if hit is not None:
            asin = (hit.group(1) if hit.group(1) is not None else hit.group(2)).decode("utf-8", "replace").strip()
            if asin not in wanted:
                skipped += 1
                continue
        try:
            record = _meta_record(line.decode("utf-8").strip())
            if not isinstance(record, dict):
                raise ValueError(f"expected a dict literal, got {type(record).__name__}")
            asin = record.get("asin")
            if not isinstance(asin, str) or not asin.strip():
                raise ValueError("no 'asin'")
            fields = meta_fields(record)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            malformed(lineno, one_line(exc, 200))
            continue
        item = wanted.get(asin.strip())
        if item is None:
            skipped += 1
        elif item in found:
            duplicates += 1
        else:
            found[item] = fields
    stats = {
        "meta_lines": n_lines,
        "meta_malformed_lines": malformed.count,
        "meta_malformed_first_lines": malformed.first_lines,
        "meta_duplicate_lines": duplicates,
        "meta_lines_of_dropped_items": skipped,
    }
    return found, stats


# ---------------------------------------------------------------- writing


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty destination unless ``overwrite``."""
    if overwrite or not dest.exists():
        return
    if dest.is_dir() and not any(dest.iterdir()):
        return
    raise ConfigError(
        "prepare.overwrite",
        f"destination {dest} already exists and is not empty; set prepare.overwrite=true to replace it",
    )


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the complete ``tmp`` folder to ``dest`` (replacing it when ``overwrite``)."""
    check_destination(dest, overwrite)
    old = None
    if dest.exists() or dest.is_symlink():
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        if old is not None:
            os.rename(old, dest)
        raise ConfigError("prepare.overwrite", f"cannot publish {dest}: {one_line(exc, 200)}") from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def write_dataset_files(
    out: Path,
    name: str,
    inter: pd.DataFrame,
    user_names: list[str],
    item_names: list[str],
    meta: dict[int, dict[str, str]] | None,
) -> None:
    inter.to_csv(out / f"{name}.inter", sep="\t", index=False)
    pd.DataFrame({"asin": item_names, "itemID": np.arange(len(item_names))}).to_csv(
        out / "i_id_mapping.csv", sep="\t", index=False
    )
    pd.DataFrame({"user_id": user_names, "userID": np.arange(len(user_names))}).to_csv(
        out / "u_id_mapping.csv", sep="\t", index=False
    )
    if meta is not None:
        empty = dict.fromkeys(META_COLUMNS, "")
        rows = [meta.get(i, empty) for i in range(len(item_names))]
        frame = pd.DataFrame({"itemID": np.arange(len(item_names)), "asin": item_names})
        for column in META_COLUMNS:
            frame[column] = [r[column] for r in rows]
        frame.to_csv(out / f"meta-{name}.csv", index=False)


# ---------------------------------------------------------------- the whole preparation


def _validate(name: str, k, rule: str) -> None:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ConfigError("dataset.name", f"must be a plain folder name (letters, digits, '.', '_', '-'), got {name!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("prepare.k", f"must be an integer >= 1, got {k!r}")
    if rule not in SPLIT_RULES:
        raise ConfigError("prepare.split", f"must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")


def prepare(
    name: str,
    reviews: str | Path,
    meta: str | Path | None,
    dest: str | Path,
    *,
    k: int = 5,
    split: str = "random",
    seed: int = 999,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the MMRec-format dataset ``dest`` (a folder named after the dataset) and return the report.

    ``meta=None`` writes no ``meta-<name>.csv`` (every item then counts as without metadata)."""
    from mllmrec.cache import package_versions

    start = time.perf_counter()
    _validate(name, k, split)
    dest = Path(dest).expanduser().resolve()  # a symlinked folder: build beside (and replace) its target
    reviews = Path(reviews).expanduser()
    meta = Path(meta).expanduser() if meta not in (None, "") else None
    if not reviews.is_file():
        raise DataError(reviews, "reviews file not found (set prepare.reviews)")
    if meta is not None and not meta.is_file():
        raise DataError(meta, "metadata file not found (set prepare.meta, or prepare.meta=null for none)")
    check_destination(dest, overwrite)  # refuse before reading gigabytes

    raw = read_reviews(reviews, strict=strict, progress=progress)
    log.info("%s: %d reviews of %d users and %d items read", reviews, len(raw), len(raw.user_ids), len(raw.item_ids))
    deduped, n_dup = collapse_duplicates(raw)
    if n_dup:
        log.info("%d duplicate (user, item) reviews collapsed to the latest one", n_dup)
    before = {
        "users": int(len(np.unique(deduped.users))),
        "items": int(len(np.unique(deduped.items))),
        "interactions": len(deduped),
    }
    mask, passes = kcore_mask(deduped.users, deduped.items, k)
    kept = deduped.take(np.flatnonzero(mask))
    del raw, deduped, mask
    if len(kept) == 0:
        raise DataError(
            reviews, f"no interactions left after the {k}-core filter ({before['interactions']} user-item pairs read)"
        )

    user_lookup, user_names = sorted_ids(kept.users, kept.user_ids)
    item_lookup, item_names = sorted_ids(kept.items, kept.item_ids)
    users, items = user_lookup[kept.users], item_lookup[kept.items]
    order = np.lexsort((items, kept.times, users))  # canonical row order: user, time, item
    users, items = users[order], items[order]
    ratings, times = kept.ratings[order], kept.times[order]
    labels = split_labels(users, times, rule=split, seed=seed)
    inter = pd.DataFrame(
        {"userID": users, "itemID": items, "rating": ratings.astype(np.float64), "timestamp": times, "x_label": labels}
    )

    meta_rows, meta_stats = None, {}
    if meta is not None:
        meta_rows, meta_stats = read_metadata(
            meta, {a: i for i, a in enumerate(item_names)}, strict=strict, progress=progress
        )
    else:
        log.warning("prepare.meta is not set: no meta-%s.csv is written (items have no text)", name)
    without_meta = len(item_names) - (len(meta_rows) if meta_rows is not None else 0)
    if meta is not None and without_meta:
        log.warning("%s: %d of %d kept items have no metadata line (empty text)", meta, without_meta, len(item_names))

    n_users, n_items, n = len(user_names), len(item_names), len(inter)
    report = {
        "dataset": name,
        "output": str(dest),
        "inputs": {
            "reviews": str(reviews.absolute()),
            "reviews_bytes": reviews.stat().st_size,
            "meta": str(meta.absolute()) if meta is not None else None,
            "meta_bytes": meta.stat().st_size if meta is not None else None,
        },
        "settings": {"k": k, "split": split, "seed": int(seed), "strict": bool(strict)},
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "sparsity": round(1.0 - n / (n_users * n_items), 8),
        "split_counts": {s: int((labels == c).sum()) for s, c in (("train", TRAIN), ("valid", VALID), ("test", TEST))},
        **kept.stats,
        "duplicates_collapsed": n_dup,
        "before_kcore": before,
        "dropped_by_kcore": {
            "users": before["users"] - n_users, "items": before["items"] - n_items,
            "interactions": before["interactions"] - n,
        },
        "kcore_passes": passes,
        **meta_stats,
        "items_without_meta": without_meta,
    }

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_dataset_files(tmp, name, inter, user_names, item_names, meta_rows)
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["versions"] = package_versions()
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        _publish(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s", format_report(report))
    return report


def format_report(report: dict) -> str:
    s = report["split_counts"]
    before = report["before_kcore"]
    lines = [
        f"prepared {report['dataset']} -> {report['output']}",
        f"  {report['users']} users, {report['items']} items, {report['interactions']} interactions, "
        f"sparsity {report['sparsity']:.6f}",
        f"  split ({report['settings']['split']}, seed {report['settings']['seed']}): "
        f"train {s['train']}, valid {s['valid']}, test {s['test']}",
        f"  reviews: {report['review_lines']} lines, {report['review_malformed_lines']} malformed, "
        f"{report['duplicates_collapsed']} duplicates collapsed; "
        f"{report['settings']['k']}-core ({report['kcore_passes']} passes) kept "
        f"{report['interactions']} of {before['interactions']} interactions, "
        f"{report['users']} of {before['users']} users, {report['items']} of {before['items']} items",
    ]
    if report["inputs"]["meta"] is not None:
        lines.append(
            f"  metadata: {report['meta_lines']} lines, {report['meta_malformed_lines']} malformed, "
            f"{report['items_without_meta']} kept items without metadata"
        )
    else:
        lines.append("  metadata: none (prepare.meta not set)")
    lines.append(f"  report: {Path(report['output']) / REPORT}")
    return "\n".join(lines)
