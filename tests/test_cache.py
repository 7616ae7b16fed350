"""mllmrec.cache.ArtifactCache: build once, reuse, manifests, no half-written artifacts."""

from __future__ import annotations

import json

import pytest

from mllmrec.cache import MANIFEST, ArtifactCache, stable_hash


def _entries(folder):
    """A stage folder's entries, the (permanent, empty) ``.<key>.lock`` files aside."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


class CountingBuild:
    def __init__(self, payload: str = "hello"):
        self.calls = 0
        self.payload = payload

    def __call__(self, out):
        self.calls += 1
        (out / "data.txt").write_text(self.payload)
        return {"rows": 3, "dim": 2}


def test_builds_once_then_reuses(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", "tiny")
    build = CountingBuild()
    first = cache.fetch("encode", {"kind": "items", "model": "m"}, {"texts": "abc"}, build)
    assert build.calls == 1 and first.reused is False
    assert first.path == tmp_path / "cache" / "tiny" / "encode" / first.key
    assert first.file("data.txt").read_text() == "hello"

    def must_not_build(out):
        raise AssertionError("build called for a cached artifact")

    second = cache.fetch("encode", {"model": "m", "kind": "items"}, {"texts": "abc"}, must_not_build)  # key order irrelevant
    assert second.reused is True
    assert second.key == first.key and second.path == first.path
    assert second.manifest == first.manifest
    # a fresh cache object on the same folder (a new process) reuses it too
    third = ArtifactCache(tmp_path / "cache", "tiny").fetch("encode", {"kind": "items", "model": "m"}, {"texts": "abc"}, build)
    assert third.reused is True and build.calls == 1


def test_manifest_contents(tmp_path):
    cache = ArtifactCache(tmp_path, "tiny")
    art = cache.fetch("graph", {"alpha": 0.7, "layers": 1}, {"features": "k1", "knn": "k2"}, CountingBuild())
    manifest = json.loads((art.path / MANIFEST).read_text())
    assert manifest == art.manifest
    for key in ("config", "inputs", "counts", "seconds", "versions"):
        assert key in manifest, key
    assert manifest["stage"] == "graph" and manifest["key"] == art.key and manifest["dataset"] == "tiny"
    assert manifest["config"] == {"alpha": 0.7, "layers": 1}
    assert manifest["inputs"] == {"features": "k1", "knn": "k2"}
    assert manifest["counts"] == {"rows": 3, "dim": 2}
    assert isinstance(manifest["seconds"], (int, float)) and manifest["seconds"] >= 0
    assert {"python", "torch", "numpy"} <= set(manifest["versions"])


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = ArtifactCache(tmp_path, "tiny")

    def broken(out):
        (out / "partial.npy").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.fetch("encode", {"kind": "items"}, {"texts": "x"}, broken)
    stage_dir = tmp_path / "tiny" / "encode"
    assert not stage_dir.exists() or _entries(stage_dir) == []  # neither final nor temp folder
    assert not list(tmp_path.rglob("partial.npy"))
    assert not list(tmp_path.rglob(MANIFEST))

    # a later good build of the same key succeeds and is not mistaken for a cached one
    build = CountingBuild()
    art = cache.fetch("encode", {"kind": "items"}, {"texts": "x"}, build)
    assert build.calls == 1 and art.reused is False
    assert sorted(p.name for p in art.path.iterdir()) == ["data.txt", MANIFEST]
    assert _entries(stage_dir) == [art.key]


def test_keyboard_interrupt_during_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path, "tiny")

    def interrupted(out):
        (out / "x").write_text("1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.fetch("reason", {}, {}, interrupted)
    assert _entries(tmp_path / "tiny" / "reason") == []


def test_different_config_or_inputs_give_different_keys(tmp_path):
    cache = ArtifactCache(tmp_path, "tiny")
    build = CountingBuild()
    a = cache.fetch("graph-cooc", {"k_c": 10}, {"train": "h"}, build)
    b = cache.fetch("graph-cooc", {"k_c": 15}, {"train": "h"}, build)
    c = cache.fetch("graph-cooc", {"k_c": 10}, {"train": "other"}, build)
    d = cache.fetch("graph-cooc", {"k_c": 10}, {"train": "h"}, build, version=2)
    assert build.calls == 4
    assert len({a.key, b.key, c.key, d.key}) == 4
    assert len({a.path, b.path, c.path, d.path}) == 4
    assert not any(x.reused for x in (a, b, c, d))
    # other datasets and stages live in their own folders
    e = ArtifactCache(tmp_path, "other").fetch("graph-cooc", {"k_c": 10}, {"train": "h"}, build)
    assert e.reused is False and e.path.parent.parent.name == "other"


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash({"a": 1})) == 16
