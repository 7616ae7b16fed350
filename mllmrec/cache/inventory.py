"""What a cache folder holds: artifacts, damaged ones moved aside, temporary build folders and
resumable work folders, per dataset and stage; which artifacts finished runs reference."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mllmrec.cache import integrity
from mllmrec.cache.integrity import ManifestError

KINDS = ("artifact", "damaged", "tmp", "work")


@dataclass
class Entry:
    dataset: str
    stage: str
    name: str
    path: Path
    kind: str  # one of KINDS
    size: int
    mtime: float  # an artifact's folder is touched each time it is reused: "last used"

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[0] if self.kind in ("artifact", "damaged") else self.name

    def age_days(self, now: float | None = None) -> float:
        return ((now or time.time()) - self.mtime) / 86400

    def manifest(self) -> dict | None:
        try:
            return integrity.read_manifest(self.path)
        except ManifestError:
            return None


def kind_of(name: str) -> str | None:
    if name.startswith(".work-"):
        return "work"
    if name.startswith(".") and ".tmp-" in name:
        return "tmp"
    if ".damaged-" in name:
        return "damaged"
    if not name.startswith("."):
        return "artifact"
    return None


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def scan(root: Path, dataset: str | None = None, stage: str | None = None) -> Iterator[Entry]:
    """Every entry under ``root/<dataset>/<stage>/``, optionally restricted to one dataset/stage."""
    for ds in _subdirs(root):
        if dataset and ds.name != dataset:
            continue
        for st in _subdirs(ds):
            if stage and st.name != stage:
                continue
            for p in _subdirs(st):
                kind = kind_of(p.name)
                if kind is not None:
                    yield Entry(ds.name, st.name, p.name, p, kind, tree_size(p), p.stat().st_mtime)


def run_references(runs_dir: Path, skip: Path | None = None) -> set[Path]:
    """Artifact folders named by the ``artifacts`` of every ``metrics.json`` under ``runs_dir``."""
    refs: set[Path] = set()
    if not runs_dir.is_dir():
        return refs
    skip = skip.resolve() if skip else None
    for folder, dirs, files in os.walk(runs_dir):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(folder, d).resolve() != skip]
        if "metrics.json" not in files:
            continue
        try:
            metrics = json.loads(Path(folder, "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        for path in (metrics.get("artifacts") or {}).values() if isinstance(metrics, dict) else ():
            refs.add(Path(str(path)).resolve())
    return refs


def referenced(entries: Iterable[Entry], refs: set[Path]) -> set[Path]:
    """``refs`` closed over manifest inputs: an artifact a referenced one was built from (a graph
    from its kNN and co-occurrence pieces) is referenced too (same dataset, matched by key)."""
    artifacts = [e for e in entries if e.kind == "artifact"]
    by_key: dict[tuple[str, str], list[Entry]] = {}
    for e in artifacts:
        by_key.setdefault((e.dataset, e.key), []).append(e)
    keep = {e.path.resolve() for e in artifacts if e.path.resolve() in refs}
    todo = [e for e in artifacts if e.path.resolve() in keep]
    while todo:
        entry = todo.pop()
        inputs = (entry.manifest() or {}).get("inputs") or {}
        for value in inputs.values():
            for dep in by_key.get((entry.dataset, str(value)), []):
                if dep.path.resolve() not in keep:
                    keep.add(dep.path.resolve())
                    todo.append(dep)
    return keep


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
