"""The stage artifact cache (library, integrity checks, lock) and its CLI (``python -m mllmrec.cache``)."""

from mllmrec.cache.integrity import MANIFEST
from mllmrec.cache.lock import LockTimeout, file_lock
from mllmrec.cache.store import Artifact, ArtifactCache, CacheWriteError, package_versions, stable_hash

__all__ = ["MANIFEST", "Artifact", "ArtifactCache", "CacheWriteError", "LockTimeout", "file_lock",
           "package_versions", "stable_hash"]
