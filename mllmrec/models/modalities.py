"""Item modality features as data.

A dataset config may name MMRec-style feature files, one row per itemID::

    dataset:
      features: {image: image_feat.npy, text: text_feat.npy}   # relative to data_dir, or absolute

Without a ``text`` file, the encode stage's item embeddings (sentence-transformers on the item
texts) are the text modality, as on the embedded office dataset
(:func:`mllmrec.pipeline.modality_inputs` wires this).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mllmrec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODALITIES = ("text", "image")


def load_feature_file(path: Path, n_items: int, row: str = "item", key: str = "dataset.features") -> np.ndarray:
    """A ``[n_items, d]`` float32 matrix from a ``.npy`` file, validated (one-line errors); ``row``: what
    a row is (``item``: row = itemID, ``user``: row = userID), ``key``: the setting that names the file."""
    if not path.is_file():
        raise DataError(path, f"feature file not found ({key} names it)")
    try:
        feat = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a data error
        raise DataError(path, f"not a readable .npy array ({type(exc).__name__})") from None
    if feat.ndim != 2:
        raise DataError(path, f"expected a 2-D array [items, dim], got shape {feat.shape}")
    if feat.shape[0] != n_items:
        raise DataError(path, f"has {feat.shape[0]} rows but the dataset has {n_items} {row}s (row = {row}ID)")
    if not np.issubdtype(feat.dtype, np.number):
        raise DataError(path, f"non-numeric dtype {feat.dtype}")
    bad = np.flatnonzero(~np.isfinite(feat).all(axis=1))
    if bad.size:
        raise DataError(path, f"non-finite value in row {int(bad[0])} ({row}ID {int(bad[0])})")
    return np.ascontiguousarray(feat, dtype=np.float32)


def data_path(name, data_dir) -> Path:
    """A file named in the dataset config: absolute, or relative to the dataset's ``data_dir``."""
    path = Path(str(name)).expanduser()
    return path if path.is_absolute() else Path(str(data_dir)).expanduser() / path


def feature_files(named, data_dir) -> dict[str, Path]:
    """The modality -> file mapping of ``dataset.features`` (``named``; paths resolved against
    ``data_dir``, the dataset's ``data_dir``)."""
    named = named or {}
    unknown = sorted(set(named) - set(MODALITIES))
    if unknown:
        raise ConfigError("dataset.features", f"unknown modality {unknown[0]!r} (known: {', '.join(MODALITIES)})")
    return {modality: data_path(name, data_dir) for modality, name in named.items() if name}


def load_modalities(files: dict[str, Path], n_items: int, text_fallback=None) -> dict[str, np.ndarray]:
    """Every available modality: the ``files`` (see :func:`feature_files`), and ``text_fallback``
    (the encode stage's item embeddings) as the text modality when no text file is named."""
    mods = {m: load_feature_file(p, n_items) for m, p in files.items()}
    if "text" not in mods and text_fallback is not None:
        mods["text"] = np.asarray(text_fallback, dtype=np.float32)
    mods = {m: mods[m] for m in MODALITIES if m in mods}  # fixed order: text, image
    if mods:
        log.info("%s", modalities_line(mods, files))
    return mods


def modalities_line(mods: dict[str, np.ndarray], files: dict[str, Path]) -> str:
    """One line: the item modalities the model is built with, each one's source and shape."""
    parts = [f"{m} from {files[m] if m in files else 'the encode stage item embeddings'} "
             f"({mods[m].shape[0]} x {mods[m].shape[1]})" for m in mods]
    return f"item modalities ({len(mods)}): " + ", ".join(parts)


def require_modalities(modalities: dict, model: str, needed: str = "any") -> None:
    """One-line error when a model lacks the modality it needs (``needed``: 'any' or a name)."""
    if needed == "any" and not modalities:
        raise ConfigError("dataset.features", f"{model} needs at least one item modality (text or image); none found")
    if needed != "any" and needed not in modalities:
        raise ConfigError("dataset.features", f"{model} needs the {needed!r} modality; the dataset has "
                          f"{', '.join(modalities) or 'none'}")
