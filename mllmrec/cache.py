"""Stage artifact cache: the one place where stage outputs are stored, keyed and reused.

Layout: ``<cache_dir>/<dataset>/<stage>/<key>/`` holding the stage's files and a
``manifest.json`` (stage, key, config, input keys/hashes, counts, seconds, package versions).
An artifact is built in a uniquely named temporary folder beside its final place and renamed
into place only when complete, so a crash or a concurrent run never leaves a partial artifact
where a reader would find it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PACKAGES = ("mllmrec", "torch", "numpy", "scipy", "pandas", "sentence-transformers", "transformers", "vllm")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict
    reused: bool

    def file(self, name: str) -> Path:
        return self.path / name


class ArtifactCache:
    def __init__(self, root: str | Path, dataset: str):
        self.root = Path(root).expanduser().resolve()
        self.dataset = dataset

    def path_for(self, stage: str, key: str) -> Path:
        return self.root / self.dataset / stage / key

    @staticmethod
    def key_for(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], version: int = 1) -> str:
        """The key :meth:`fetch` gives the artifact of (stage, config, inputs, version)."""
        return stable_hash({"stage": stage, "version": version, "config": dict(config), "inputs": dict(inputs)})

    def work_dir(self, stage: str, key: str) -> Path:
        """A hidden folder beside the stage's artifacts for resumable, partial work (not an artifact)."""
        return self.root / self.dataset / stage / f".work-{key}"

    def fetch(
        self,
        stage: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        build: Callable[[Path], Mapping[str, Any] | None],
        version: int = 1,
    ) -> Artifact:
        """Return the artifact for (stage, config, inputs), building it with ``build(tmp_dir)`` if absent.

        ``build`` writes its files into the folder it is given and returns counts for the manifest.
        """
        key = self.key_for(stage, config, inputs, version)
        final = self.path_for(stage, key)
        manifest_path = final / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            log.info("%s: reusing cached artifact %s", stage, final)
            return Artifact(stage, key, final, manifest, reused=True)

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        start = time.perf_counter()
        try:
            counts = build(tmp) or {}
            manifest = {
                "stage": stage,
                "key": key,
                "dataset": self.dataset,
                "version": version,
                "config": dict(config),
                "inputs": dict(inputs),
                "counts": dict(counts),
                "seconds": round(time.perf_counter() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": package_versions(),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                if not manifest_path.is_file():  # not a concurrent publisher: a real error
                    raise
                log.info("%s: an identical artifact was published concurrently; using it", stage)
                shutil.rmtree(tmp, ignore_errors=True)
                manifest = json.loads(manifest_path.read_text())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("%s: built in %.1fs -> %s", stage, manifest["seconds"], final)
        return Artifact(stage, key, final, manifest, reused=False)
