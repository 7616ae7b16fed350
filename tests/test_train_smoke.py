"""End to end: ``python -m mllmrec.train`` and ``python -m stages.graph`` on the tiny fixture.

Runs as subprocesses (the real CLI, Hydra run dir, offline MiniLM encoder). The runs share one
output folder so that the second run exercises the stage cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_module, tiny_overrides

TEST_KEYS = ("test/recall@10", "test/recall@20", "test/ndcg@10", "test/ndcg@20")
METRIC_KEYS = ("val/recall@20", *TEST_KEYS)


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Two identical training runs (different run dirs) on one shared output/cache folder.

    The second one runs without the progress bar (a display setting: the same metrics)."""
    out = tmp_path_factory.mktemp("smoke")
    procs = {}
    for run, extra in (("run", []), ("run2", ["trainer.enable_progress_bar=false"])):
        proc = run_module("mllmrec.train", *tiny_overrides(out, "trainer.max_epochs=2", data_dir=tiny_dir, run=out / run),
                          *extra, cwd=out)
        assert proc.returncode == 0, f"{run} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        procs[run] = proc
    return out, procs


def load_metrics(out: Path, run: str) -> dict:
    path = out / run / "metrics.json"
    assert path.is_file(), f"no {path}"
    return json.loads(path.read_text())


@pytest.mark.slow
def test_train_writes_metrics_json(runs):
    out, _ = runs
    m = load_metrics(out, "run")
    for key in METRIC_KEYS:
        assert key in m, key
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["epochs"] == 2
    assert m["best_epoch"] in (0, 1)
    assert isinstance(m["fit_seconds"], (int, float)) and m["fit_seconds"] >= 0
    assert m["test/recall@20"] >= m["test/recall@10"]
    # (that training improves the ranking is checked in test_training_learns.py: on this fixture an
    # untrained model already reaches test Recall@20 > .3, 20 of 30 items being ranked)
    assert (out / "run" / "checkpoints").is_dir()


@pytest.mark.slow
def test_second_run_reuses_the_cache_and_is_deterministic(runs):
    out, procs = runs
    first_log = procs["run"].stdout + procs["run"].stderr
    second_log = procs["run2"].stdout + procs["run2"].stderr
    assert "reusing cached artifact" not in first_log  # a fresh cache: everything built
    for stage in ("reason", "encode", "graph"):
        assert f"{stage}: reusing cached artifact" in second_log, stage
    m1, m2 = load_metrics(out, "run"), load_metrics(out, "run2")
    for key in (*METRIC_KEYS, "best_epoch", "epochs"):
        assert m1[key] == m2[key], key
    assert m1["artifacts"] == m2["artifacts"]


@pytest.mark.slow
def test_progress_bar_can_be_switched_off(runs):
    _, procs = runs
    assert "Epoch 0:" in procs["run"].stdout  # Lightning's TQDM bar (it writes to stdout)
    assert "Epoch 0:" not in procs["run2"].stdout + procs["run2"].stderr


@pytest.mark.slow
def test_cache_layout(runs):
    out, _ = runs
    cache = out / "cache" / "tiny"
    encode = [p for p in (cache / "encode").iterdir() if not p.name.startswith(".")]  # .<key>.lock aside
    assert len(encode) == 2, encode  # items and users, nothing half-written
    kinds = sorted(json.loads((p / "manifest.json").read_text())["config"]["kind"] for p in encode)
    assert kinds == ["items", "users"]
    for p in encode:
        counts = json.loads((p / "manifest.json").read_text())["counts"]
        assert counts["dim"] == 384 and counts["rows"] in (30, 40)
    for stage in ("reason", "graph", "graph-knn", "graph-cooc"):
        entries = [p for p in (cache / stage).iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1 and (entries[0] / "manifest.json").is_file(), stage


@pytest.mark.slow
def test_graph_stage_cli_prints_the_artifact(runs, tiny_dir):
    out, _ = runs
    proc = run_module("stages.graph", *tiny_overrides(out, "trainer.max_epochs=2", data_dir=tiny_dir, run=out / "stage"),
                      cwd=out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("graph: ")]
    assert len(lines) == 1, proc.stdout
    path = Path(lines[0].removeprefix("graph: ").removesuffix(" (reused)"))
    assert lines[0].endswith("(reused)")  # the training runs built it already
    assert path.parent == out / "cache" / "tiny" / "graph"
    assert (path / "item_star.npy").is_file() and (path / "adjacency.npz").is_file()
    assert str(path) == load_metrics(out, "run")["artifacts"]["graph"]
