"""Integrity of a published artifact: the manifest's file table (size + content hash per file),
the checks made before reuse, and moving a damaged artifact aside.

A manifest written by this version holds ``files: {relative path: {"size": n, "<hash>": hex}}``
and ``hash: <hashlib algorithm>``. Manifests written before it have no file table ("legacy"):
they are checked for readability only (a ``.npy``/``.npz``/``.parquet``/``.json`` file whose
length or structure is wrong is caught, a changed byte inside a well-formed file is not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from mllmrec.errors import MLLMRecError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HASH = "sha256"  # measured side by side with blake2b on the dev CPU (SHA-NI): 658 vs 296 MB/s
VERIFY_MODES = ("size", "auto", "full")
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """``manifest.json`` exists but cannot be parsed as an artifact manifest."""


def file_hash(path: Path, algorithm: str = HASH) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def artifact_files(folder: Path) -> list[Path]:
    """The artifact's data files (recursively), the manifest excluded, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def file_table(folder: Path, algorithm: str = HASH) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, algorithm: hex digest}}`` for every data file of ``folder``."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, algorithm: file_hash(p, algorithm)}
            for p in artifact_files(folder)}


def read_manifest(folder: Path) -> dict | None:
    """The parsed manifest, ``None`` when there is none; :class:`ManifestError` when it is unusable."""
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ManifestError(f"{MANIFEST} is not an artifact manifest")
    return manifest


def total_size(manifest: dict) -> int | None:
    files = manifest.get("files")
    return None if files is None else sum(int(f.get("size", 0)) for f in files.values())


def wants_hashes(manifest: dict, verify: str, hash_limit_bytes: int) -> bool:
    """``size``: never; ``full``: always; ``auto``: when the artifact's files total at most the limit."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"cache verify mode must be one of {VERIFY_MODES}, got {verify!r}")
    if verify == "auto":
        size = total_size(manifest)
        return size is not None and size <= hash_limit_bytes
    return verify == "full"


def check(folder: Path, manifest: dict, hashes: bool) -> str | None:
    """What is wrong with the artifact in ``folder`` (one phrase), or ``None`` when it is sound."""
    files = manifest.get("files")
    if files is None:
        return check_readable(folder)
    algorithm = manifest.get("hash", HASH)
    for name, info in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} is unreadable ({exc.strerror or exc})"
        if size != info.get("size"):
            return f"{name} has {size} bytes, its manifest says {info.get('size')}"
    if not hashes:
        return None
    for name, info in files.items():
        try:
            digest = file_hash(folder / name, algorithm)
        except OSError as exc:
            return f"{name} is unreadable ({exc.strerror or exc})"
        if digest != info.get(algorithm):
            return f"{name}: {algorithm} of its content differs from its manifest"
    return None


def check_readable(folder: Path) -> str | None:
    """Structural checks for artifacts without a file table (legacy manifests)."""
    for path in artifact_files(folder):
        name = path.relative_to(folder).as_posix()
        try:
            problem = _structure(path)
        except Exception as exc:  # noqa: BLE001 - any failure to parse the file is damage
            problem = f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if problem:
            return f"{name} {problem}"
    return None


def _structure(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:  # a newer format: let numpy map it (catches a short file)
                np.load(path, mmap_mode="r", allow_pickle=False)
                return None
            shape, _fortran, dtype = read(f)
            offset = f.tell()
        if dtype.hasobject:
            return None
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        actual = path.stat().st_size
        return None if actual == expected else f"has {actual} bytes, its header implies {expected}"
    if suffix == ".npz":
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"member {bad} fails its CRC"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.ParquetFile(path).metadata  # noqa: B018 - reads and checks the footer
        return None
    if suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    return None


def quarantine(folder: Path, reason: str, what: str) -> Path | None:
    """Move a damaged artifact aside to ``<key>.damaged-<UTC time>`` (one WARNING line)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{folder.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged-{stamp}-{n}")
    try:
        os.rename(folder, target)
    except FileNotFoundError:  # someone else moved it already
        return None
    except OSError as exc:  # e.g. a read-only shared cache: say what is wrong and what to do
        raise MLLMRecError(f"{what}: cached artifact {folder} is damaged ({reason}) and cannot be moved aside "
                           f"({exc.strerror or exc}); remove it, or point paths.cache_dir at a writable copy") from exc
    log.warning("%s: cached artifact %s is damaged (%s); moved aside to %s, rebuilding", what, folder, reason, target.name)
    return target
