"""``python -m mllmrec.cache ls|verify|gc|du`` on a small fixture cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import run_module

from mllmrec.cache import ArtifactCache

OLD = time.time() - 100 * 86400


def _build(size: int):
    def build(out: Path):
        (out / "data.bin").write_bytes(b"x" * size)
        return {"bytes": size}
    return build


@pytest.fixture
def fixture_cache(tmp_path):
    """outputs/cache/{tiny,other}/<stage>/... plus one finished run referencing two artifacts."""
    out = tmp_path / "outputs"
    root = out / "cache"
    tiny, other = ArtifactCache(root, "tiny"), ArtifactCache(root, "other")
    arts = {
        "A": tiny.fetch("encode", {"kind": "items"}, {"texts": "t"}, _build(1000)),  # referenced by the run
        "B": tiny.fetch("encode", {"kind": "users"}, {"texts": "u"}, _build(2000)),  # unreferenced, old
        "K": tiny.fetch("graph-knn", {"k_s": 10}, {"features": "kA"}, _build(300)),  # needed by G
        "R": tiny.fetch("reason", {"history": "train"}, {"data": "d"}, _build(50)),  # unreferenced, recent
        "O": other.fetch("encode", {"kind": "items"}, {"texts": "o"}, _build(400)),  # other dataset, old
    }
    arts["G"] = tiny.fetch("graph", {"alpha": 0.7}, {"knn": arts["K"].key, "features": "kA"}, _build(500))
    stage = root / "tiny" / "encode"
    extra = {"damaged": stage / f"{arts['A'].key}.damaged-20260101T000000Z",
             "tmp": stage / f".{arts['B'].key}.tmp-123-abcdef12", "work": stage / ".work-0011223344556677"}
    for path in extra.values():
        path.mkdir()
        (path / "part.bin").write_bytes(b"y" * 100)
    for name, art in arts.items():
        if name != "R":
            os.utime(art.path, (OLD, OLD))
    for path in extra.values():
        os.utime(path, (OLD, OLD))
    run = out / "runs" / "tiny" / "2026-01-01_00-00-00"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "artifacts": {
        "encode/items": str(arts["A"].path), "graph": str(arts["G"].path)}}))
    return out, root, arts, extra


def cli(out: Path, *args: str):
    return run_module("mllmrec.cache", *args, f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}", cwd=out)


@pytest.mark.slow
def test_ls_lists_artifacts_with_their_config(fixture_cache):
    out, root, arts, _ = fixture_cache
    proc = cli(out, "ls")
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith(("#", "dataset/stage"))]
    assert len(rows) == 6, proc.stdout
    row_a = next(ln for ln in rows if arts["A"].key in ln)
    size = 1000 + (arts["A"].path / "manifest.json").stat().st_size  # data file + manifest
    assert row_a.startswith("tiny/encode") and '{"kind":"items"}' in row_a and f"{size / 1024:.1f} KiB" in row_a
    assert "100.0d" in row_a  # not used for 100 days
    only = cli(out, "ls", "dataset.name=tiny", "stage=encode")
    keys = {arts["A"].key, arts["B"].key}
    assert sum(1 for ln in only.stdout.splitlines() if any(k in ln for k in keys)) == 2
    assert arts["O"].key not in only.stdout and arts["G"].key not in only.stdout


@pytest.mark.slow
def test_du_sums_space_per_dataset_and_stage(fixture_cache):
    out, root, _, _ = fixture_cache
    proc = cli(out, "du")
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")}
    expected = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert f"{expected / 1024:.1f}" == lines["total"][1], (expected, proc.stdout)
    enc = lines["tiny/encode"]  # artifacts, damaged, tmp, work columns: 100 B each for the extra folders
    assert enc[-6:] == ["100", "B", "100", "B", "100", "B"], enc
    assert set(lines) == {"dataset/stage", "tiny/encode", "tiny/graph", "tiny/graph-knn", "tiny/reason",
                          "other/encode", "total"}


@pytest.mark.slow
def test_verify_reports_damage_with_exit_status_1(fixture_cache):
    out, root, arts, _ = fixture_cache
    ok = cli(out, "verify")
    assert ok.returncode == 0 and "6 artifacts checked, 0 damaged" in ok.stdout, ok.stdout + ok.stderr
    data = arts["B"].file("data.bin")
    data.write_bytes(b"x" * 1999 + b"z")  # same size, other content: only the full check sees it
    bad = cli(out, "verify")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    damaged = [ln for ln in bad.stdout.splitlines() if ln.startswith("DAMAGED")]
    assert len(damaged) == 1 and str(arts["B"].path) in damaged[0] and "data.bin" in damaged[0]
    assert arts["B"].path.is_dir()  # verify alone moves nothing
    fixed = cli(out, "verify", "verify.repair=true")
    assert fixed.returncode == 1 and not arts["B"].path.exists()
    assert list(arts["B"].path.parent.glob(f"{arts['B'].key}.damaged-*"))
    assert cli(out, "verify").returncode == 0


@pytest.mark.slow
def test_gc_keeps_what_runs_use_and_what_is_recent(fixture_cache):
    out, root, arts, extra = fixture_cache
    dry = cli(out, "gc")
    assert dry.returncode == 0, dry.stderr
    listed = {ln.split()[2] for ln in dry.stdout.splitlines() if ln.startswith("would remove")}
    doomed = {str(arts["B"].path), str(arts["O"].path), str(extra["damaged"]), str(extra["tmp"])}
    assert listed == doomed, dry.stdout
    assert all(Path(p).exists() for p in doomed)  # dry run by default
    real = cli(out, "gc", "gc.dry_run=false")
    assert real.returncode == 0, real.stderr
    assert not any(Path(p).exists() for p in doomed)
    for name in ("A", "G", "K", "R"):  # referenced (K through G's inputs) or recently used
        assert arts[name].path.is_dir(), name
    assert extra["work"].is_dir()  # resumable LLM work is never collected
    assert not [p for p in root.rglob("*") if ".tmp-gc-" in p.name]
    younger = cli(out, "gc", "gc.older_than_days=1000")
    assert "would remove" not in younger.stdout


@pytest.mark.slow
def test_unknown_command_and_missing_cache_are_one_line_errors(tmp_path):
    proc = run_module("mllmrec.cache", "command=shrink", f"paths.cache_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: config 'command'")
    proc = run_module("mllmrec.cache", "ls", f"paths.cache_dir={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
