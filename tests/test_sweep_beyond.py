"""The multirun summary with eval.metrics beyond Recall/NDCG: Table 1's coverage and group-recall columns,
the cold-start table of a dataset.split=cold_items sweep, the popularity-group bar plot. A fake sweep of
known per-job metrics; expectations computed here with numpy."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from test_sweep_cells import write_job
from scipy.stats import ttest_rel

BEYOND = ["recall", "ndcg", "precision", "map", "hit", "coverage", "gini", "avg_popularity", "tail_percentage",
          "recall_groups"]
LEVEL = {"mllmrec": 0.09, "freedom": 0.146, "bpr": 0.088}


def job_metrics(rng, level):
    out = {"status": "completed", "best_epoch": 5, "epochs": 26, "fit_seconds": 3.0, "seconds_per_epoch": 0.1}
    for split in ("val", "test"):
        for k in (10, 20):
            for m in ("recall", "ndcg", "precision", "map", "hit", "coverage", "gini", "avg_popularity",
                      "tail_percentage"):
                out[f"{split}/{m}@{k}"] = float(level * (k / 20) * rng.uniform(0.5, 1.5))
            for g in ("head", "mid", "tail"):
                out[f"{split}/recall@{k}_{g}"] = float(level * rng.uniform(0.2, 2.0))
    return out


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(3)
    sweep, num, jobs = tmp_path / "sweep", 0, []
    for model, level in LEVEL.items():
        for seed in (999, 1, 2):
            m = job_metrics(rng, level)
            write_job(sweep, num, [f"model={model}", f"seed={seed}"], {"seed": seed, "graph": {"alpha": 0.7, "k_c": 10}}, m)
            jobs.append({"model": model, "seed": seed, **m})
            num += 1
    return sweep, pd.DataFrame(jobs)


def summarize(sweep, caplog, split="mmrec", metrics=BEYOND):
    from mllmrec.sweep.summary import SweepSummary

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "dataset": {"name": "fake", "split": split},
                               "eval": {"metrics": metrics}})
    with caplog.at_level(logging.INFO, logger="mllmrec.sweep.summary"):
        SweepSummary().on_multirun_end(config)


def test_table_one_has_coverage_and_group_recall_and_p_on_recall(sweep, caplog):
    sweep_dir, jobs = sweep
    summarize(sweep_dir, caplog)
    table = pd.read_csv(sweep_dir / "models.csv").set_index("model")
    for model, label in (("freedom", "FREEDOM"), ("bpr", "BPR")):
        rows = jobs[jobs.model == model]
        for column, metric in (("Cov@20", "coverage@20"), ("R@20_tail", "recall@20_tail"), ("R@20_head", "recall@20_head")):
            assert table.loc[label, f"{column}_mean"] == pytest.approx(rows[f"test/{metric}"].mean())
            assert table.loc[label, f"{column}_std"] == pytest.approx(rows[f"test/{metric}"].std(ddof=1))
        # the p-value is on test Recall@20 itself, not on a group's recall
        ref = jobs[jobs.model == "mllmrec"].set_index("seed")["test/recall@20"]
        p = ttest_rel(rows.set_index("seed")["test/recall@20"].loc[ref.index], ref).pvalue
        assert table.loc[label, "p vs MLLMRec (R@20)"] == pytest.approx(p, rel=1e-9)
    header = (sweep_dir / "models.md").read_text().splitlines()[0]
    assert "| Cov@20 |" in header and "| R@20_tail |" in header and "| p vs MLLMRec (R@20) |" in header
    assert not (sweep_dir / "cold_start.md").exists()


def test_popularity_group_bars_one_group_per_model(sweep, caplog):
    import matplotlib.image as mpimg

    sweep_dir, _ = sweep
    summarize(sweep_dir, caplog)
    img = mpimg.imread(sweep_dir / "popularity_groups.png")
    assert img.ndim == 3 and img.shape[1] > 500
    # three bar colours (matplotlib's C0, C1, C2) are drawn
    rgb = (img[..., :3] * 255).round().astype(int)
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(rgb - colour).sum(-1) < 10).sum() > 200, colour


def test_no_group_plot_without_recall_groups(sweep, caplog):
    sweep_dir, _ = sweep
    summarize(sweep_dir, caplog, metrics=["recall", "ndcg", "coverage"])
    assert not (sweep_dir / "popularity_groups.png").exists()
    assert "| Cov@20 |" in (sweep_dir / "models.md").read_text().splitlines()[0]


def test_cold_start_sweep_writes_the_cold_start_table(sweep, caplog):
    sweep_dir, jobs = sweep
    summarize(sweep_dir, caplog, split="cold_items", metrics=["recall", "ndcg", "precision", "map", "hit"])
    assert not (sweep_dir / "models.md").exists()
    table = pd.read_csv(sweep_dir / "cold_start.csv").set_index("model")
    assert set(table.index) == {"MLLMRec", "FREEDOM", "BPR"}
    rows = jobs[jobs.model == "freedom"]
    assert table.loc["FREEDOM", "MAP@20_mean"] == pytest.approx(rows["test/map@20"].mean())
    header = (sweep_dir / "cold_start.md").read_text().splitlines()[0]
    assert "| MAP@20 |" in header and "| HR@20 |" in header and "Cov@20" not in header
    assert "p vs MLLMRec (R@20)" in header
