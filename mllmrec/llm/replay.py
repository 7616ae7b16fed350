"""``llm=replay``: image descriptions and user preferences read from files the user supplies.

Accepts the official code's outputs: ``output_image2text.csv`` (the metadata plus an
``image_description`` column, keyed by ``itemID``) and ``user_preferences.csv`` (``userID``,
``preference``, ``num_interactions``), and any CSV/TSV/parquet with an id column and a text column
(names configurable: ``llm.item_id_column`` / ``llm.item_text_column``, ``llm.user_id_column`` /
``llm.user_text_column``; a text column left null is guessed from common names).
Ids are validated against the dataset: an unknown or duplicate id is a one-line error naming the
file, the column and the row; ids absent from the file get an empty text (counted, warned).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mllmrec.data import file_sha256
from mllmrec.errors import ConfigError, DataError
from mllmrec.llm.settings import ReplayFiles

log = logging.getLogger(__name__)

ITEM_TEXT_GUESSES = ("image_description", "image_text", "description_image", "text", "description")
USER_TEXT_GUESSES = ("preference", "user_preference", "preferences", "text", "description")


def read_table(path: Path) -> tuple[pd.DataFrame, bool]:
    """(frame of strings, whether rows map to file lines: CSV/TSV yes, parquet no)."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            df = pd.read_parquet(path)
            df = df.astype({c: str for c in df.columns if df[c].dtype == object})
            return df, False
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".inter")) else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, compression="infer"), True
    except pd.errors.EmptyDataError:
        raise DataError(path, "empty file") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a data error, one line
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(path, f"cannot be read: {msg}") from None


def _where(is_csv: bool, row: int) -> dict:
    return {"line": row + 2} if is_csv else {}


def load_texts(path, n: int, id_column: str, text_column: str | None, guesses, kind: str, key: str, text_key: str = ""):
    """(texts per id 0..n-1, counts). ``kind``: 'item' or 'user' for messages."""
    if not path:
        raise ConfigError(key, f"llm=replay needs a {kind} file (set {key})")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(path, f"file not found (set {key})")
    df, is_csv = read_table(path)
    df.columns = [str(c).strip() for c in df.columns]
    if id_column not in df.columns:
        raise DataError(path, f"missing id column {id_column!r}; found {list(df.columns)}", id_column)
    if text_column is None:
        text_column = next((c for c in guesses if c in df.columns), None)
        if text_column is None:
            raise DataError(path, f"no text column found (tried {', '.join(guesses)}; set {text_key or 'its name'}); "
                                  f"found {list(df.columns)}")
    elif text_column not in df.columns:
        raise DataError(path, f"missing text column {text_column!r}; found {list(df.columns)}", text_column)
    raw = df[id_column].astype(str).str.strip()
    ok = raw.str.fullmatch(r"\+?\d+(\.0+)?")  # 12 or 12.0 (a float column written by pandas)
    if not ok.all():
        row = int(np.flatnonzero(~ok.to_numpy())[0])
        where = _where(is_csv, row)
        raise DataError(path, f"non-integer {kind} id {df[id_column].iloc[row]!r}"
                        + ("" if is_csv else f" (row {row})"), id_column, where.get("line"))
    ids = raw.astype(float).astype(np.int64).to_numpy()
    unknown = ids >= n
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(path, f"{kind} id {ids[row]} is not in the dataset ({n} {kind}s)"
                        + ("" if is_csv else f" (row {row})"), id_column, _where(is_csv, row).get("line"))
    _, first = np.unique(ids, return_index=True)
    if len(first) != len(ids):
        row = int(np.setdiff1d(np.arange(len(ids)), first)[0])
        raise DataError(path, f"duplicate {kind} id {ids[row]}" + ("" if is_csv else f" (row {row})"),
                        id_column, _where(is_csv, row).get("line"))
    values = df[text_column].fillna("").astype(str).map(lambda s: " ".join(s.split()))
    values = values.where(~values.str.lower().isin(["nan", "none"]), "")
    texts = [""] * n
    for i, t in zip(ids, values):
        texts[int(i)] = t
    missing = n - len(ids)
    if missing:
        log.warning("%s: %d of %d %ss are not in the file; they get an empty text", path, missing, n, kind)
    counts = {"file_rows": int(len(ids)), "missing_ids": int(missing), "empty_texts": sum(1 for t in texts if not t),
              "text_column": text_column}
    return texts, counts, file_sha256(path), path


def artifact(cache, stage: str, data, files: ReplayFiles, kind: str, output: str, id_name: str):
    """The replayed texts as the stage's artifact (same layout as generated ones)."""
    if kind == "item":
        file, idc, txt, guesses, n = (files.items_file, files.item_id_column, files.item_text_column,
                                      ITEM_TEXT_GUESSES, data.n_items)
        key = "llm.items_file"
    else:
        file, idc, txt, guesses, n = (files.users_file, files.user_id_column, files.user_text_column,
                                      USER_TEXT_GUESSES, data.n_users)
        key = "llm.users_file"
    texts, counts, sha, path = load_texts(file, n, idc, txt, guesses, kind, key, f"llm.{kind}_text_column")
    config = {"backend": "replay", "id_column": idc, "text_column": counts["text_column"]}
    inputs = {"file": sha, "rows": str(n)}

    def build(out):
        pd.DataFrame({
            id_name: np.arange(n), "text": texts,
            "finish_reason": ["replay" if t else "missing" for t in texts],
            "prompt_tokens": 0, "completion_tokens": 0,
        }).to_parquet(out / output, index=False)
        return {"rows": n, "source": str(path), **counts}

    return cache.fetch(stage, config, inputs, build)
