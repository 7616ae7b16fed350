"""Writing the dataset folder: built in a temporary folder beside the destination, then renamed
into place (:func:`mllmrec.files.atomic_dir`), so a half-written dataset is never seen."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from mllmrec.errors import ConfigError, one_line
from mllmrec.files import atomic_dir
from mllmrec.prepare.metadata import META_COLUMNS


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


@contextmanager
def publishing(dest: Path, overwrite: bool) -> Iterator[Path]:
    """``with publishing(dest, overwrite) as tmp: fill tmp`` -> ``dest`` replaced by ``tmp`` at the end.

    The destination is checked again just before the rename (it may have appeared meanwhile); a
    failed rename is a one-line :class:`ConfigError`; on any failure the temporary folder is removed."""
    filled = False
    try:
        with atomic_dir(dest, replace=overwrite) as tmp:
            yield tmp
            check_destination(dest, overwrite)
            filled = True
    except OSError as exc:
        if not filled:
            raise
        raise ConfigError("prepare.overwrite", f"cannot publish {dest}: {one_line(exc, 200)}") from None


def write_dataset_files(
    out: Path,
    name: str,
    inter: pd.DataFrame,
    user_names: list[str],
    item_names: list[str],
    meta: dict[int, dict[str, str]] | None,
) -> None:
    """``<name>.inter``, the two id mappings and (with ``meta``) ``meta-<name>.csv`` into ``out``."""
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
