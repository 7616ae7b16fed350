"""The stage cache on a shared disk: damaged artifacts detected, reported in one line, moved aside
and rebuilt; disk errors while writing; the per-key lock with real concurrent processes."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from mllmrec.cache import MANIFEST, ArtifactCache, CacheWriteError, LockTimeout, file_lock
from mllmrec.cache import store as store_mod

EMB = np.arange(600, dtype=np.float32).reshape(50, 12) / 7.0  # the expected content, fixed here


class Build:
    """An encode-like stage: one .npy and one text file; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, out: Path):
        self.calls += 1
        np.save(out / "embeddings.npy", EMB)
        (out / "notes.txt").write_text("fifty rows\n")
        return {"rows": 50}


def fetch(cache: ArtifactCache, build):
    return cache.fetch("encode", {"kind": "items"}, {"texts": "t"}, build)


def damaged_dirs(art) -> list[str]:
    return sorted(p.name for p in art.path.parent.iterdir() if ".damaged-" in p.name)


def _truncate(art):
    p = art.file("embeddings.npy")
    p.write_bytes(p.read_bytes()[:-100])


def _remove(art):
    art.file("notes.txt").unlink()


def _grow(art):
    with open(art.file("notes.txt"), "a") as f:
        f.write("x")


def _corrupt_manifest(art):
    text = (art.path / MANIFEST).read_text()
    (art.path / MANIFEST).write_text(text[: len(text) // 2])


def _no_manifest(art):
    (art.path / MANIFEST).unlink()


def _flip_byte(art):  # same size, other content: only a content hash sees it
    p = art.file("embeddings.npy")
    blob = bytearray(p.read_bytes())
    blob[-1] ^= 0xFF
    p.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage, phrase", [
    (_truncate, "embeddings.npy has"),
    (_remove, "notes.txt is missing"),
    (_grow, "notes.txt has 12 bytes, its manifest says 11"),
    (_corrupt_manifest, "manifest.json is not valid JSON"),
    (_no_manifest, "manifest.json is missing"),
    (_flip_byte, "embeddings.npy: sha256 of its content differs"),
])
def test_damage_is_reported_moved_aside_and_rebuilt(tmp_path, caplog, damage, phrase):
    cache = ArtifactCache(tmp_path, "tiny")  # verify=auto: a small artifact is hashed too
    build = Build()
    first = fetch(cache, build)
    assert set(first.manifest["files"]) == {"embeddings.npy", "notes.txt"}
    damage(first)
    with caplog.at_level(logging.WARNING):
        again = fetch(cache, build)
    assert build.calls == 2 and again.reused is False and again.path == first.path
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(first.path) in warnings[0] and phrase in warnings[0], warnings[0]
    assert len(damaged_dirs(first)) == 1 and damaged_dirs(first)[0].startswith(f"{first.key}.damaged-")
    assert damaged_dirs(first)[0] in warnings[0]
    np.testing.assert_array_equal(np.load(again.file("embeddings.npy")), EMB)  # identical content
    assert again.manifest["files"] == first.manifest["files"]
    third = fetch(cache, build)  # the rebuilt one is sound
    assert third.reused is True and build.calls == 2


def test_verify_size_skips_hashes_and_full_hashes_big_artifacts(tmp_path):
    build = Build()
    art = fetch(ArtifactCache(tmp_path, "tiny", verify="size"), build)
    _flip_byte(art)
    assert fetch(ArtifactCache(tmp_path, "tiny", verify="size"), build).reused is True
    # auto hashes only artifacts under the limit: this one (3 KB) is over a 1 KB limit
    assert fetch(ArtifactCache(tmp_path, "tiny", verify="auto", hash_limit_mb=1 / 1024), build).reused is True
    assert build.calls == 1
    rebuilt = fetch(ArtifactCache(tmp_path, "tiny", verify="full", hash_limit_mb=1 / 1024), build)
    assert rebuilt.reused is False and build.calls == 2
    with pytest.raises(ValueError, match="verify mode"):
        ArtifactCache(tmp_path, "tiny", verify="sometimes")


def test_cache_settings_come_from_the_config(compose_cfg):
    from mllmrec.errors import ConfigError

    cache = ArtifactCache.from_config(compose_cfg("cache.verify=full", "cache.hash_limit_mb=1", "cache.lock_timeout=5"))
    assert (cache.verify, cache.hash_limit_bytes, cache.lock_timeout, cache.dataset) == ("full", 2**20, 5.0, "tiny")
    with pytest.raises(ConfigError, match="'cache.verify'"):
        ArtifactCache.from_config(compose_cfg("cache.verify=sometimes"))


def _legacy(art):
    manifest = json.loads((art.path / MANIFEST).read_text())
    del manifest["files"], manifest["hash"]
    (art.path / MANIFEST).write_text(json.dumps(manifest))


def test_legacy_manifest_without_file_table(tmp_path, caplog):
    """Manifests written before the file table: reused when their files are well-formed, rebuilt
    (with the warning) when a .npy is shorter than its header says."""
    cache, build = ArtifactCache(tmp_path, "tiny", verify="full"), Build()
    art = fetch(cache, build)
    _legacy(art)
    assert fetch(cache, build).reused is True and build.calls == 1
    _truncate(art)
    with caplog.at_level(logging.WARNING):
        again = fetch(cache, build)
    assert again.reused is False and build.calls == 2
    assert any("embeddings.npy has" in r.getMessage() and "header implies" in r.getMessage() for r in caplog.records)
    assert "files" in again.manifest  # the rebuilt one has the table


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "manifest.json")


@pytest.mark.parametrize("where", ["build", "publish"])
def test_disk_full_is_one_line_and_nothing_is_published(tmp_path, monkeypatch, where):
    cache = ArtifactCache(tmp_path, "tiny")

    def build(out: Path):
        np.save(out / "embeddings.npy", EMB)
        if where == "build":
            with open(out / "big.bin", "wb") as f:
                f.write(b"x" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device", str(out / "big.bin"))
        return {}

    if where == "publish":
        monkeypatch.setattr(store_mod, "write_json", _enospc)
    with pytest.raises(CacheWriteError) as info:
        fetch(cache, build)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "free on that filesystem" in msg
    assert ("big.bin" if where == "build" else "manifest.json") in msg
    stage = tmp_path / "tiny" / "encode"
    assert [p.name for p in stage.iterdir() if not p.name.endswith(".lock")] == []  # no temp, no artifact
    monkeypatch.undo()
    assert fetch(cache, Build()).reused is False  # and the next attempt builds it


def test_other_os_errors_propagate_unchanged(tmp_path):
    def build(out):
        raise OSError(errno.EACCES, "Permission denied", "x")

    with pytest.raises(PermissionError):
        fetch(ArtifactCache(tmp_path, "tiny"), build)


def _slow_builder(root: str, log_file: str, go) -> str:
    def build(out: Path):
        with open(log_file, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # the other processes ask for the key meanwhile
        np.save(out / "embeddings.npy", EMB)
        return {"rows": 50}

    go.wait(30)
    art = fetch(ArtifactCache(root, "tiny"), build)
    return f"{art.key} {art.reused}"


@pytest.mark.slow
def test_concurrent_processes_build_one_key_once(tmp_path):
    ctx = mp.get_context("spawn")  # fresh interpreters: nothing shared but the directory
    log_file = tmp_path / "builds.log"
    with ctx.Manager() as manager:
        go = manager.Event()
        with ctx.Pool(3) as pool:
            pending = [pool.apply_async(_slow_builder, (str(tmp_path / "cache"), str(log_file), go)) for _ in range(3)]
            time.sleep(1.0)
            go.set()
            results = [r.get(120) for r in pending]
    assert log_file.read_text().count("built") == 1, log_file.read_text()
    assert len({r.split()[0] for r in results}) == 1
    assert sorted(r.split()[1] for r in results) == ["False", "True", "True"]
    stage = tmp_path / "cache" / "tiny" / "encode"
    key = results[0].split()[0]
    assert sorted(p.name for p in stage.iterdir()) == sorted([key, f".{key}.lock"])


def test_file_lock_waits_and_times_out(tmp_path):
    path = tmp_path / "k.lock"
    with file_lock(path):
        with pytest.raises(LockTimeout, match="still held"):
            with file_lock(path, timeout=0.3, poll=0.05):
                pass  # pragma: no cover
    with file_lock(path, timeout=0.3):  # released: taken at once
        assert path.exists()


def test_damage_in_a_read_only_cache_is_one_clear_error(tmp_path, monkeypatch):
    from mllmrec.cache import integrity
    from mllmrec.errors import MLLMRecError

    cache, build = ArtifactCache(tmp_path, "tiny"), Build()
    art = fetch(cache, build)
    _truncate(art)

    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(integrity.os, "rename", refuse)
    with pytest.raises(MLLMRecError) as info:
        fetch(cache, build)
    msg = str(info.value)
    assert "\n" not in msg and str(art.path) in msg and "cannot be moved aside" in msg and "Read-only" in msg
    assert build.calls == 1  # nothing rebuilt over a folder it could not move
