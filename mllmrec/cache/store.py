"""Stage artifact cache: the one place where stage outputs are stored, keyed and reused.

Layout: ``<cache_dir>/<dataset>/<stage>/<key>/`` holding the stage's files and a
``manifest.json`` (stage, key, config, input keys/hashes, counts, seconds, package versions, and
the size and content hash of every file). An artifact is built in a uniquely named temporary
folder beside its final place and renamed into place only when complete, so a crash or a
concurrent run never leaves a partial artifact where a reader would find it. Building one key
holds ``.<key>.lock`` (see :mod:`mllmrec.cache.lock`): a second process wanting the same key
waits, then reuses what the first published. Before reuse the files are checked against the
manifest (see :mod:`mllmrec.cache.integrity`); a damaged artifact is moved aside and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

from mllmrec.cache import integrity
from mllmrec.cache.integrity import HASH, MANIFEST, ManifestError
from mllmrec.cache.lock import file_lock
from mllmrec.errors import ConfigError, MLLMRecError
from mllmrec.files import publish_dir, temp_sibling

log = logging.getLogger(__name__)

_PACKAGES = ("mllmrec", "torch", "numpy", "scipy", "pandas", "sentence-transformers", "transformers", "vllm")
# errors of the disk rather than of the code: reported as one line, naming what and the free space
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


class CacheWriteError(MLLMRecError):
    """Writing an artifact failed because of the disk (full, quota, I/O error, read-only)."""


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


def free_space(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
    return "unknown"


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
    """``verify``: ``size`` (file sizes only), ``auto`` (sizes, plus content hashes for artifacts of
    at most ``hash_limit_mb``), ``full`` (always hashes). ``lock_timeout``: seconds to wait for
    another builder of the same key (``None``: no limit)."""

    def __init__(self, root: str | Path, dataset: str, verify: str = "auto", hash_limit_mb: float = 256,
                 lock_timeout: float | None = None):
        self.root = Path(root).expanduser().resolve()
        self.dataset = dataset
        integrity.wants_hashes({}, verify, 0)  # validates the mode
        self.verify = verify
        self.hash_limit_bytes = int(float(hash_limit_mb) * 2**20)
        self.lock_timeout = lock_timeout

    @classmethod
    def from_config(cls, cfg, dataset: str | None = None) -> "ArtifactCache":
        """From a composed config: ``paths.cache_dir``, ``dataset.name`` and the ``cache`` node."""
        opts = cfg.get("cache") or {}
        timeout = opts.get("lock_timeout")
        if str(opts.get("verify", "auto")) not in integrity.VERIFY_MODES:
            raise ConfigError("cache.verify", f"must be one of {', '.join(integrity.VERIFY_MODES)}, got {opts.get('verify')!r}")
        return cls(cfg.paths.cache_dir, dataset or cfg.dataset.name, verify=str(opts.get("verify", "auto")),
                   hash_limit_mb=float(opts.get("hash_limit_mb", 256)),
                   lock_timeout=None if timeout is None else float(timeout))

    def path_for(self, stage: str, key: str) -> Path:
        return self.root / self.dataset / stage / key

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / self.dataset / stage / f".{key}.lock"  # hidden: listings of a stage show artifacts only

    @staticmethod
    def key_for(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], version: int = 1) -> str:
        """The key :meth:`fetch` gives the artifact of (stage, config, inputs, version)."""
        return stable_hash({"stage": stage, "version": version, "config": dict(config), "inputs": dict(inputs)})

    def work_dir(self, stage: str, key: str) -> Path:
        """A hidden folder beside the stage's artifacts for resumable, partial work (not an artifact)."""
        return self.root / self.dataset / stage / f".work-{key}"

    def lookup(self, stage: str, key: str, repair: bool = False) -> Artifact | None:
        """The published artifact of ``key`` when it passes the integrity checks, else ``None``.

        With ``repair``, a damaged one (files or manifest) is moved aside with one WARNING line;
        call that only while holding the key's lock."""
        final = self.path_for(stage, key)
        try:
            manifest = integrity.read_manifest(final)
            if manifest is None:
                if not final.exists():
                    return None
                problem = f"{MANIFEST} is missing"
            else:
                hashes = integrity.wants_hashes(manifest, self.verify, self.hash_limit_bytes)
                problem = integrity.check(final, manifest, hashes)
        except ManifestError as exc:
            problem = str(exc)
        if problem is None:
            _touch(final)
            return Artifact(stage, key, final, manifest, reused=True)
        if repair:
            integrity.quarantine(final, problem, f"{self.dataset}/{stage}")
        return None

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
        found = self.lookup(stage, key)
        if found is None:
            what = f"{self.dataset}/{stage}/{key}"
            with file_lock(self.lock_path(stage, key), timeout=self.lock_timeout, what=what):
                found = self.lookup(stage, key, repair=True)  # another process may have built it meanwhile
                if found is None:
                    return self._build(stage, key, config, inputs, build, version)
        log.info("%s: reusing cached artifact %s", stage, found.path)
        return found

    def _build(self, stage, key, config, inputs, build, version) -> Artifact:
        final = self.path_for(stage, key)
        tmp = temp_sibling(final)
        start = time.perf_counter()
        try:
            tmp.mkdir(parents=True)
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
                "hash": HASH,
                "files": integrity.file_table(tmp),
            }
            write_json(tmp / MANIFEST, manifest)
            try:
                publish_dir(tmp, final, replace=False)
            except OSError:
                concurrent = self.lookup(stage, key)  # a builder that did not see our lock (e.g. NFS nolock)
                if concurrent is None:
                    raise
                log.info("%s: an identical artifact was published concurrently; using it", stage)
                shutil.rmtree(tmp, ignore_errors=True)
                return concurrent
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in DISK_ERRNOS:
                raise CacheWriteError(
                    f"{stage}: writing artifact {final} failed: {exc.strerror or exc}"
                    f" ({exc.filename or tmp}); {free_space(final.parent)} free on that filesystem; nothing was published"
                ) from exc
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("%s: built in %.1fs -> %s", stage, manifest["seconds"], final)
        return Artifact(stage, key, final, manifest, reused=False)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())


def _touch(folder: Path) -> None:
    """Mark the artifact as used now (``gc`` measures age since last use); best effort."""
    try:
        os.utime(folder)
    except OSError:
        pass
