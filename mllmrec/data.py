"""Loading and validating datasets in MMRec's atomic format (SPEC section 2).

``<name>.inter`` (tab-separated, header): ``userID``, ``itemID``, ``x_label`` (0 train, 1 valid,
2 test), optional ``rating`` and ``timestamp``. ``meta-<name>.csv`` (optional): ``itemID`` plus
any of the text fields. Either file may be gzip-compressed (``.gz`` suffix).

Every problem with the input raises :class:`~mllmrec.errors.DataError` naming the file, the
column and the file line (line 1 is the header).
"""

from __future__ import annotations

import ast
import hashlib
import html
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mllmrec.errors import DataError, one_line

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
TEXT_FIELDS = ("title", "brand", "categories", "description")
TRAIN, VALID, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "valid": VALID, "test": TEST}


def find_file(data_dir: Path, filename: str) -> Path | None:
    """``filename`` in ``data_dir``, or its ``.gz`` twin; None when neither exists."""
    for cand in (data_dir / filename, data_dir / f"{filename}.gz"):
        if cand.is_file():
            return cand
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, compression="infer")
    except pd.errors.EmptyDataError:
        raise DataError(path, "empty file (expected a header line and data rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(path, f"cannot be parsed: {one_line(exc)}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def file_line(path: Path, row: int) -> int:
    """The file line (1 = header) on which data row ``row`` (0-based, as pandas counts) starts.

    Only called to report an error, so it may re-read the file: pandas skips blank lines and a
    quoted cell may span several lines, so ``row + 2`` is not the line in general.
    """
    import csv
    import gzip

    sep = "\t" if ".inter" in path.name else ","
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter=sep)
            next(reader, None)  # header
            seen = -1
            while True:
                start = reader.line_num + 1
                record = next(reader, None)
                if record is None:
                    break
                if not record or all(not cell.strip() for cell in record) and len(record) <= 1:
                    continue  # blank line: pandas skips it
                seen += 1
                if seen == row:
                    return start
    except (OSError, csv.Error):
        pass
    return row + 2


def _int_column(df: pd.DataFrame, column: str, path: Path, *, allow_negative: bool = False) -> np.ndarray:
    """Parse ``column`` as integers; the first bad cell is reported with its file line."""
    raw = df[column].str.strip()
    ok = raw.str.fullmatch(r"[+-]?\d+")
    if not ok.all():
        row = int(np.flatnonzero(~ok.to_numpy())[0])
        raise DataError(path, f"non-integer value {df[column].iloc[row]!r}", column, file_line(path, row))
    values = raw.astype(np.int64).to_numpy()
    if not allow_negative and (values < 0).any():
        row = int(np.flatnonzero(values < 0)[0])
        raise DataError(path, f"negative id {values[row]}", column, file_line(path, row))
    return values


def flatten_categories(value: str) -> str:
    """Amazon 2014 categories are Python-literal lists of lists; make them a readable string."""
    text = value.strip()
    if not text.startswith("["):
        return text
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    out: list[str] = []

    def walk(node):
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
        elif node is not None and str(node).strip() and str(node).strip() not in out:
            out.append(str(node).strip())

    walk(parsed)
    return ", ".join(out)


@dataclass
class RecData:
    """One dataset: interactions in history order plus optional item metadata."""

    name: str
    n_users: int
    n_items: int
    users: np.ndarray  # int64, one per interaction, grouped by user in history order
    items: np.ndarray
    split: np.ndarray  # int8: 0 train, 1 valid, 2 test
    meta: pd.DataFrame | None = None  # index itemID 0..n_items-1, string columns
    fingerprint: str = ""
    sources: dict = field(default_factory=dict)
    # split code -> the items ranked for it (a cold-start split's cold items); None: every item
    candidates: dict | None = None

    def pairs(self, split: str | int) -> tuple[np.ndarray, np.ndarray]:
        code = SPLITS[split] if isinstance(split, str) else split
        mask = self.split == code
        return self.users[mask], self.items[mask]

    def non_candidates(self, split: str | int) -> np.ndarray | None:
        """The items that are no ranking candidate for ``split`` (None: all items are candidates)."""
        code = SPLITS[split] if isinstance(split, str) else split
        if not self.candidates or code not in self.candidates:
            return None
        return np.setdiff1d(np.arange(self.n_items), self.candidates[code])

    def negative_items(self) -> np.ndarray | None:
        """The items BPR negatives are drawn from (None: all items): a cold-start split's warm items."""
        if not self.candidates:
            return None
        return np.setdiff1d(np.arange(self.n_items), np.concatenate(list(self.candidates.values())))

    def split_matrix(self, split: str | int) -> sp.csr_matrix:
        """Binary users x items CSR matrix of one split's interactions."""
        u, i = self.pairs(split)
        m = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    @cached_property
    def train_matrix(self) -> sp.csr_matrix:
        """Binary users x items CSR matrix of the training interactions."""
        return self.split_matrix(TRAIN)

    @cached_property
    def train_fingerprint(self) -> str:
        """Hash of the training interactions only (what the co-occurrence graph depends on)."""
        u, i = self.pairs(TRAIN)
        h = hashlib.sha256()
        h.update(np.array([self.n_users, self.n_items], np.int64).tobytes())
        h.update(np.ascontiguousarray(u, np.int64).tobytes())
        h.update(np.ascontiguousarray(i, np.int64).tobytes())
        return h.hexdigest()

    def history(self, split: str = "train") -> list[np.ndarray]:
        """Per user, the items of ``split`` ('train' or 'all') in history order."""
        if split == "all":
            u, i = self.users, self.items
        else:
            u, i = self.pairs(split)
        order = np.argsort(u, kind="stable")
        counts = np.bincount(u, minlength=self.n_users)
        return np.split(i[order], np.cumsum(counts)[:-1])

    def item_field(self, column: str) -> list[str]:
        if self.meta is None or column not in self.meta.columns:
            return [""] * self.n_items
        return self.meta[column].tolist()

    def summary(self) -> str:
        n = len(self.users)
        counts = {k: int((self.split == v).sum()) for k, v in SPLITS.items()}
        density = n / max(1, self.n_users * self.n_items)
        return (
            f"{self.name}: {self.n_users} users, {self.n_items} items, {n} interactions "
            f"(train {counts['train']}, valid {counts['valid']}, test {counts['test']}), "
            f"density {density:.5f}, item text: {'yes' if self.meta is not None else 'no'}"
        )


def load_interactions(path: Path):
    df = _read_table(path, "\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(path, f"missing required column(s) {', '.join(missing)}; found {list(df.columns)}", missing[0])
    if len(df) == 0:
        raise DataError(path, "no interactions (the file holds only a header)")
    users = _int_column(df, "userID", path)
    items = _int_column(df, "itemID", path)
    split = _int_column(df, "x_label", path)
    bad = ~np.isin(split, (TRAIN, VALID, TEST))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(path, f"x_label must be 0 (train), 1 (valid) or 2 (test), got {split[row]}", "x_label", file_line(path, row))
    order = np.arange(len(df))
    if "timestamp" in df.columns:
        ts = pd.to_numeric(df["timestamp"].str.strip(), errors="coerce")
        if ts.isna().any():
            row = int(np.flatnonzero(ts.isna().to_numpy())[0])
            raise DataError(path, f"non-numeric timestamp {df['timestamp'].iloc[row]!r}", "timestamp", file_line(path, row))
        order = np.lexsort((order, ts.to_numpy(), users))  # per user by time, ties in file order
    else:
        order = np.argsort(users, kind="stable")  # per user, file order
    users, items, split = users[order], items[order], split[order].astype(np.int8)

    # duplicate (user, item) rows: keep the latest one
    key = users * (int(items.max()) + 1) + items
    _, last_rev = np.unique(key[::-1], return_index=True)
    keep = np.sort(len(key) - 1 - last_rev)
    n_dup = len(key) - len(keep)
    if n_dup:
        log.warning("%s: %d duplicate (userID, itemID) rows collapsed to the latest one", path, n_dup)
        users, items, split = users[keep], items[keep], split[keep]
    return users, items, split, n_dup


def load_meta(path: Path, n_items: int) -> pd.DataFrame:
    df = _read_table(path, ",")
    if "itemID" not in df.columns:
        raise DataError(path, f"missing required column itemID; found {list(df.columns)}", "itemID")
    ids = _int_column(df, "itemID", path)
    out_of_range = ids >= n_items
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise DataError(path, f"itemID {ids[row]} is not in the interaction data ({n_items} items)", "itemID", file_line(path, row))
    _, first = np.unique(ids, return_index=True)
    if len(first) != len(ids):
        dup_rows = np.setdiff1d(np.arange(len(ids)), first)
        raise DataError(path, f"duplicate itemID {ids[dup_rows[0]]}", "itemID", file_line(path, int(dup_rows[0])))
    columns = [c for c in df.columns if c != "itemID"]
    meta = pd.DataFrame({c: [""] * n_items for c in columns}, index=pd.RangeIndex(n_items, name="itemID"))
    for c in columns:
        values = df[c].astype(str)
        if c in TEXT_FIELDS:
            values = values.map(html.unescape)
        if c == "categories":
            values = values.map(flatten_categories)
        meta.loc[ids, c] = values.str.strip().to_numpy()
    missing_items = n_items - len(ids)
    if missing_items:
        log.warning("%s: %d items have no metadata row (empty text)", path, missing_items)
    empty_title = int((meta["title"] == "").sum()) if "title" in meta.columns else n_items
    if empty_title:
        log.warning("%s: %d items have an empty title", path, empty_title)
    return meta


def load_dataset(name: str, data_dir: str | Path) -> RecData:
    """Load ``<data_dir>/<name>.inter`` (+ ``meta-<name>.csv``), validated."""
    data_dir = Path(data_dir).expanduser()
    inter_path = find_file(data_dir, f"{name}.inter")
    if inter_path is None:
        raise DataError(data_dir / f"{name}.inter", "file not found (set dataset.data_dir to the folder that holds it)")
    users, items, split, n_dup = load_interactions(inter_path)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    for what, ids, n in (("userID", users, n_users), ("itemID", items, n_items)):
        gaps = n - len(np.unique(ids))
        if gaps:
            log.warning("%s: column '%s': %d ids in [0, %d] have no interaction (MMRec ids should be "
                        "contiguous from 0); they still count as %s", inter_path, what, gaps, n - 1,
                        "ranking candidates" if what == "itemID" else "users")
    meta_path = find_file(data_dir, f"meta-{name}.csv")
    meta = load_meta(meta_path, n_items) if meta_path is not None else None

    digest = hashlib.sha256()
    sources = {"inter": str(inter_path)}
    digest.update(file_sha256(inter_path).encode())
    if meta_path is not None:
        sources["meta"] = str(meta_path)
        digest.update(file_sha256(meta_path).encode())
    data = RecData(name, n_users, n_items, users, items, split, meta, digest.hexdigest(), sources)
    data.sources["duplicates_dropped"] = n_dup

    n_train = np.bincount(users[split == TRAIN], minlength=n_users)
    has_heldout = np.bincount(users[split != TRAIN], minlength=n_users) > 0
    cold = int(((n_train == 0) & has_heldout).sum())
    if cold:
        log.warning("%s: %d users have no training interaction; they are left out of evaluation", inter_path, cold)
    if (split == TRAIN).sum() == 0:
        raise DataError(inter_path, "no training interactions (x_label 0)", "x_label")
    return data
