"""alpha x K_c x seed multirun: per-job metrics, summary.csv, summary_by_cell.csv, heatmap.png, offline W&B
runs, one encode."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from conftest import run_module, tiny_overrides
from wandb_reader import history_keys, summary_values


def sweep_args(tiny_dir, out, *extra):
    return tiny_overrides(out, "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0", *extra,
                          data_dir=tiny_dir, sweep=out / "sweep")


@pytest.fixture(scope="module")
def grid(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    assert os.environ["WANDB_MODE"] == "offline"
    # 2 x 2 x 2: the preset's seed axis (seeds 1, 2) over alpha x K_c
    proc = run_module("mllmrec.train", *sweep_args(tiny_dir, out, "logger=wandb", "graph.alpha=0.5,0.7", "graph.k_c=5,10",
                                                   "experiment=grid_seeds", "seeds=2"), cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_each_job_writes_metrics(grid):
    out, _ = grid
    jobs = sorted(p for p in (out / "sweep").iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 8
    for job in jobs:
        m = json.loads((job / "metrics.json").read_text())
        assert m["status"] == "completed" and 0 <= m["val/recall@20"] <= 1


@pytest.mark.slow
def test_summary_csv_and_heatmap(grid):
    out, proc = grid
    df = pd.read_csv(out / "sweep" / "summary.csv")
    assert len(df) == 8
    assert sorted(zip(df["graph.alpha"], df["graph.k_c"], df["seed"])) == [
        (a, k, s) for a in (0.5, 0.7) for k in (5, 10) for s in (1, 2)]
    assert (df["status"] == "completed").all()
    for col in ("val/recall@20", "test/recall@20", "test/ndcg@20", "best_epoch", "epochs", "fit_seconds"):
        assert df[col].notna().all(), col
    png = (out / "sweep" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "sweep" / "heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200


@pytest.mark.slow
def test_summary_by_cell_groups_the_seeds(grid):
    out, proc = grid
    jobs = pd.read_csv(out / "sweep" / "summary.csv")
    cells = pd.read_csv(out / "sweep" / "summary_by_cell.csv")
    assert len(cells) == 4 and (cells["n"] == 2).all() and "seed" not in cells
    # independently: pandas over the per-job rows
    want = jobs.groupby(["graph.alpha", "graph.k_c"])["test/recall@20"].agg(["mean", "std"])
    for _, c in cells.iterrows():
        mean, std = want.loc[(c["graph.alpha"], c["graph.k_c"])]
        assert c["test/recall@20_mean"] == pytest.approx(mean) and c["test/recall@20_std"] == pytest.approx(std)
    means = jobs.groupby(["graph.alpha", "graph.k_c"], sort=False)["val/recall@20"].mean()
    best = cells[cells["best"]].iloc[0]
    assert (best["graph.alpha"], best["graph.k_c"]) == means.idxmax()
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "best by validation R@20" in ln)
    assert f"graph.alpha={best['graph.alpha']:g},graph.k_c={int(best['graph.k_c'])} " in line
    assert "over 2 seeds" in line and "n=2" in line and " ± " in line


@pytest.mark.slow
def test_offline_wandb_runs_hold_validation_history(grid):
    out, _ = grid
    runs = sorted((out / "sweep").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 8
    for run in runs:
        keys = history_keys(run)
        assert {"val/recall@20", "train/loss", "test/recall@20"} <= keys, keys
    assert list((out / "sweep" / "wandb").glob("offline-run-*/run-*.wandb")), "no sweep-summary run"


@pytest.mark.slow
def test_sweep_summary_run_carries_the_best_cells_mean_std_n(grid):
    out, _ = grid
    (run,) = (out / "sweep" / "wandb").glob("offline-run-*/run-*.wandb")
    summary = summary_values(run)
    best = pd.read_csv(out / "sweep" / "summary_by_cell.csv").query("best").iloc[0]
    assert summary["best/cell"] == best["cell"] and summary["best/n"] == 2
    for m in ("val/recall@20", "test/recall@20", "test/ndcg@20"):
        assert summary[f"best/{m}/mean"] == pytest.approx(best[f"{m}_mean"])
        assert summary[f"best/{m}/std"] == pytest.approx(best[f"{m}_std"])
    assert summary["summary_by_cell/nrows"] == 4 and summary["summary/nrows"] == 8


@pytest.mark.slow
def test_encode_runs_once_for_the_whole_grid(grid):
    out, proc = grid
    logs = proc.stdout + proc.stderr
    assert logs.count("encode: built in") == 2  # items and users, once each
    assert len([p for p in (out / "cache" / "tiny" / "encode").iterdir() if not p.name.startswith(".")]) == 2
    assert len([p for p in (out / "cache" / "tiny" / "graph-knn").iterdir() if not p.name.startswith(".")]) == 1  # alpha-independent
    assert len([p for p in (out / "cache" / "tiny" / "graph-cooc").iterdir() if not p.name.startswith(".")]) == 2  # one per K_c
    assert len([p for p in (out / "cache" / "tiny" / "graph").iterdir() if not p.name.startswith(".")]) == 4


@pytest.mark.slow
def test_a_failed_job_is_marked_and_the_others_stand(tiny_dir, tmp_path):
    proc = run_module("mllmrec.train", *sweep_args(tiny_dir, tmp_path, "logger=none", "graph.alpha=0.7", "graph.k_c=5,0"),
                      cwd=tmp_path)
    assert proc.returncode == 1
    df = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(df["status"]) == ["completed", "failed"]
    failed = df[df["status"] == "failed"].iloc[0]
    assert "graph.k_c" in failed["error"]
    ok = df[df["status"] == "completed"].iloc[0]
    assert 0 <= ok["test/recall@20"] <= 1
    assert "1 of 2 jobs failed" in proc.stderr


@pytest.mark.slow
def test_the_summary_written_again_from_split_sweeps_equals_the_multiruns(grid, tmp_path):
    """python -m mllmrec.sweep: the 8 jobs split over two sweep dirs (as when a model's seeds run
    after the others) and joined with --into give the multirun's own summary_by_cell.csv; one dir
    alone is summarised in place; a missing --into or an existing folder is a one-line error."""
    import shutil

    from mllmrec.sweep.__main__ import main

    out, _ = grid
    jobs = sorted((p for p in (out / "sweep").iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))
    halves = [tmp_path / "a", tmp_path / "b"]
    for half, part in zip(halves, (jobs[:4], jobs[4:])):
        for job in part:
            shutil.copytree(job, half / job.name)
    main([str(h) for h in halves] + ["--into", str(tmp_path / "joined")])
    want = pd.read_csv(out / "sweep" / "summary_by_cell.csv")
    got = pd.read_csv(tmp_path / "joined" / "summary_by_cell.csv")
    pd.testing.assert_frame_equal(got, want)
    assert len(list((tmp_path / "joined").glob("*/metrics.json"))) == 8
    main([str(halves[1])])  # one dir: in place, its four jobs
    assert len(pd.read_csv(halves[1] / "summary.csv")) == 4
    for argv in ([str(h) for h in halves], [str(halves[0]), "--into", str(tmp_path / "joined")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
