"""Smoke test: the benchmark harness runs end to end on the tiny fixture (no timing asserted)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_module


@pytest.mark.slow
def test_bench_runs_on_tiny_fixture(tiny_dir, tmp_path):
    root = tmp_path / "data"
    for name in ("baby", "sports"):
        (root / name).mkdir(parents=True)
        shutil.copy(tiny_dir / "tiny.inter", root / name / f"{name}.inter")
    proc = run_module("mllmrec.bench", f"data_root={root}", "epochs=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "bench.json").read_text())
    for key in ("graph.baby.seconds", "graph.baby.peak_mb", "graph.baby.dense_seconds", "graph.baby.dense_peak_mb",
                "train.sports.epoch_seconds", "train.sports.official_loop_epoch_seconds", "eval.sports.seconds",
                "train.sports.gemm_floor_seconds", "train.sports.gemm_floor_train_seconds"):
        assert isinstance(result[key], float) and result[key] > 0, key
    # the sparse graph stage and the dense official-style algorithm build the same graph
    assert result["graph.baby.identical_edges"] is True
    assert result["eval.sports.users"] == 40
    assert "| graph, baby" in proc.stdout
