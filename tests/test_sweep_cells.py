"""Seeds as a sweep axis: the multirun summary grouped by cell (every swept setting but the seed).

A fake sweep directory with known per-job metrics; every expectation below is computed here with
numpy from the raw numbers, not by the code under test.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

# (alpha, K_c) -> {seed: (val R@20, test R@20)}; "failed" marks a job that did not finish
GRID = {
    (0.4, 5): {1: (0.10, 0.090), 2: (0.11, 0.095), 3: (0.12, 0.100), 4: "failed"},
    (0.4, 10): {1: (0.12, 0.110), 2: (0.13, 0.120), 3: (0.14, 0.115)},   # best mean val R@20 (.13)
    (0.6, 5): {1: (0.125, 0.105), 2: (0.115, 0.100), 3: (0.135, 0.125)},  # gap .005 < SE .0082
    (0.6, 10): {1: (0.09, 0.080), 2: (0.12, 0.110), 3: (0.15, 0.140)},   # gap .01 < SE .0183
    (0.8, 5): {1: (0.125, 0.130)},                                          # one seed: not judged
}


def write_job(sweep, num, overrides, cfg, metrics):
    job = sweep / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def metrics_of(val, test, **extra):
    return {"status": "completed", "val/recall@20": val, "test/recall@20": test, "val/recall@10": val / 2,
            "val/ndcg@10": val / 3, "val/ndcg@20": val / 2.5, "test/recall@10": test / 2, "test/ndcg@10": test / 3,
            "test/ndcg@20": test / 2.5, "best_epoch": 3, "epochs": 24, "fit_seconds": 1.5, "seconds_per_epoch": 0.0625, **extra}


def fake_grid(sweep):
    num = 0
    for (alpha, kc), seeds in GRID.items():
        for seed, result in seeds.items():
            cfg = {"seed": seed, "graph": {"alpha": alpha, "k_c": kc}, "model": {"d": 64}}
            ovs = [f"graph.alpha={alpha}", f"graph.k_c={kc}", f"seed={seed}", "dataset.name=fake"]
            write_job(sweep, num, ovs, cfg, None if result == "failed" else metrics_of(*result))
            num += 1
    return sweep


def expected_cells():
    """Mean, std (ddof=1), n per cell; the best by mean val R@20; the cells within 1 SE of the difference."""
    out = {}
    for cell, seeds in GRID.items():
        vals = np.array([r for r in seeds.values() if r != "failed"])
        out[cell] = {"n": len(vals), "val_mean": vals[:, 0].mean(), "test_mean": vals[:, 1].mean(),
                     "val_std": vals[:, 0].std(ddof=1) if len(vals) > 1 else math.nan,
                     "test_std": vals[:, 1].std(ddof=1) if len(vals) > 1 else math.nan}
    best = max(out, key=lambda c: out[c]["val_mean"])
    b = out[best]
    tied = set()
    for cell, c in out.items():
        if cell != best and c["n"] > 1:
            se = math.sqrt(b["val_std"] ** 2 / b["n"] + c["val_std"] ** 2 / c["n"])
            if b["val_mean"] - c["val_mean"] <= se:
                tied.add(cell)
    return out, best, tied


@pytest.fixture
def sweep(tmp_path):
    return fake_grid(tmp_path / "sweep")


@pytest.fixture
def cells(sweep):
    from mllmrec.sweep.cells import summarize_cells
    from mllmrec.sweep.summary import collect

    return summarize_cells(collect(sweep))


def key_of(row):
    return (float(row["graph.alpha"]), int(row["graph.k_c"]))


def test_cells_hold_exact_means_stds_and_counts(cells):
    want, _, _ = expected_cells()
    assert len(cells) == len(GRID)
    assert "seed" not in cells.columns
    for _, row in cells.iterrows():
        w = want[key_of(row)]
        assert row["n"] == w["n"]
        for col, key in (("val/recall@20_mean", "val_mean"), ("test/recall@20_mean", "test_mean"),
                         ("val/recall@20_std", "val_std"), ("test/recall@20_std", "test_std")):
            assert row[col] == pytest.approx(w[key], abs=1e-12, nan_ok=True), (key_of(row), col)
    failed = cells.set_index(cells.apply(key_of, axis=1))["failed"]
    assert failed[(0.4, 5)] == 1 and failed.drop((0.4, 5)).eq(0).all()
    assert cells.set_index(cells.apply(key_of, axis=1)).loc[[(0.4, 10)], "seeds"].item() == "1 2 3"


def test_best_cell_is_by_mean_validation_and_the_tied_set_by_one_se(cells, sweep):
    _, best, tied = expected_cells()
    assert best == (0.4, 10)
    assert tied == {(0.6, 5), (0.6, 10)}  # the hand check of the fixture: (0.4, 5) is 2.4 SE behind
    got_best = [key_of(r) for _, r in cells[cells["best"]].iterrows()]
    got_tied = {key_of(r) for _, r in cells[cells["within_1se_of_best"]].iterrows()}
    assert got_best == [best]
    assert got_tied == tied
    # the best single JOB (.15, alpha .6 K_c 10) is not the best cell: selection is by the mean
    from mllmrec.sweep.summary import best_row, collect

    assert float(best_row(collect(sweep), "val/recall@20")["val/recall@20"]) == 0.15


def test_one_seed_per_cell_keeps_todays_behaviour(tmp_path):
    from mllmrec.sweep.cells import summarize_cells
    from mllmrec.sweep.summary import best_row, collect

    sweep = tmp_path / "sweep"
    for num, (alpha, val) in enumerate(((0.4, 0.11), (0.5, 0.13), (0.6, 0.125))):
        write_job(sweep, num, [f"graph.alpha={alpha}"], {"seed": 999, "graph": {"alpha": alpha, "k_c": 10}},
                  metrics_of(val, val - 0.01))
    df = collect(sweep)
    cells = summarize_cells(df)
    assert list(cells["n"]) == [1, 1, 1]
    assert cells["val/recall@20_std"].isna().all()
    assert not cells["within_1se_of_best"].any()  # no spread, no "indistinguishable" claim
    best = cells[cells["best"]].iloc[0]
    assert best["cell"] == "graph.alpha=0.5,graph.k_c=10"
    assert best["val/recall@20_mean"] == best_row(df, "val/recall@20")["val/recall@20"] == 0.13
    from mllmrec.sweep.summary import plot_heatmap

    px = outline_pixels(plot_heatmap(cells, tmp_path / "heatmap.png"))
    assert px["red"] > 500 and px["magenta"] == 0


def outline_pixels(png) -> dict:
    """How many pixels of the heatmap are the best box's red and the within-1-SE outline's magenta
    (neither colour occurs in viridis or in the text)."""
    import matplotlib.image as mpimg

    rgb = mpimg.imread(png)[..., :3]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.15) & (rgb[..., 2] < 0.15)
    magenta = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.15) & (rgb[..., 2] > 0.9)
    return {"red": int(red.sum()), "magenta": int(magenta.sum())}


def run_summary(sweep, caplog, **cfg):
    from mllmrec.sweep.summary import SweepSummary

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "dataset": {"name": "fake"}, **cfg})
    with caplog.at_level(logging.INFO, logger="mllmrec.sweep.summary"):
        SweepSummary().on_multirun_end(config)
    return caplog.text


def test_callback_writes_cells_heatmap_and_logs_mean_std_n(sweep, caplog):
    import matplotlib.image as mpimg

    with pytest.raises(SystemExit) as exc:  # the failed job still makes the command exit 1
        run_summary(sweep, caplog)
    assert exc.value.code == 1
    by_cell = pd.read_csv(sweep / "summary_by_cell.csv")
    assert len(by_cell) == len(GRID) and len(pd.read_csv(sweep / "summary.csv")) == sum(map(len, GRID.values()))
    img = mpimg.imread(sweep / "heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    px = outline_pixels(sweep / "heatmap.png")
    assert px["red"] > 500 and px["magenta"] > 2 * 500  # two outlined cells on each of two panels
    want, _, _ = expected_cells()
    b = want[(0.4, 10)]
    line = next(ln for ln in caplog.text.splitlines() if "best by validation R@20" in ln)
    assert "graph.alpha=0.4,graph.k_c=10" in line and "over 3 seeds" in line and "n=3" in line
    assert f"val R@20 {b['val_mean']:.4f} ± {b['val_std']:.4f}" in line
    assert f"R@20 {b['test_mean']:.4f} ± {b['test_std']:.4f}" in line
    tied = next(ln for ln in caplog.text.splitlines() if "not distinguishable from the best" in ln)
    assert "graph.alpha=0.6,graph.k_c=5" in tied and "graph.alpha=0.6,graph.k_c=10" in tied
    assert "graph.alpha=0.4,graph.k_c=5" not in tied and "graph.alpha=0.8" not in tied


def test_ablation_rows_are_mean_std_n_over_seeds(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    runs = {"full": (0.10, 0.12), "wo_rs": (0.08, 0.07)}  # test R@20 of seeds 1 and 2
    num = 0
    for variant, tests in runs.items():
        for seed, test in enumerate(tests, start=1):
            write_job(sweep, num, [f"variant={variant}", f"seed={seed}"],
                      {"seed": seed, "variant": variant, "graph": {"alpha": 0.7, "k_c": 10}}, metrics_of(test + 0.01, test))
            num += 1
    run_summary(sweep, caplog)
    md = (sweep / "ablation.md").read_text()
    for variant, label in (("full", "MLLMRec"), ("wo_rs", "w/o RS")):
        vals = np.array(runs[variant])
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
        assert f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f} (2)" in row, row
    table = pd.read_csv(sweep / "ablation.csv")
    assert list(table["n"]) == [2, 2]
    assert table["R@20_std"].tolist() == pytest.approx([np.std(v, ddof=1) for v in runs.values()])


def test_models_table_is_table_one_over_seeds(tmp_path, caplog):
    """experiment=baselines: one row per model, mean ± std (n) over seeds against numpy, and the
    mean seconds per epoch."""
    sweep = tmp_path / "sweep"
    runs = {"freedom": ((0.15, 0.146, 0.6), (0.16, 0.148, 0.7)), "bpr": ((0.09, 0.088, 0.2), (0.092, 0.085, 0.26))}
    num = 0
    for model, by_seed in runs.items():
        for seed, (val, test, spe) in zip((999, 1), by_seed):
            write_job(sweep, num, [f"model={model}", f"seed={seed}"], {"seed": seed, "graph": {"alpha": 0.7, "k_c": 10}},
                      metrics_of(val, test, seconds_per_epoch=spe))
            num += 1
    run_summary(sweep, caplog)
    md = (sweep / "models.md").read_text()
    assert not (sweep / "ablation.md").exists()
    for model, label in (("freedom", "FREEDOM"), ("bpr", "BPR")):
        test, val, spe = (np.array([r[i] for r in runs[model]]) for i in (1, 0, 2))
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
        assert f"{test.mean():.4f} ± {test.std(ddof=1):.4f} (2)" in row, row
        assert f"{val.mean():.4f} ± {val.std(ddof=1):.4f} (2)" in row, row
        assert f"| {spe.mean():.2f} |" in row, row
        r10 = test / 2  # metrics_of: test R@10 = R@20 / 2
        assert row.startswith(f"| {label} | {r10.mean():.4f} ± {r10.std(ddof=1):.4f} (2) |"), row  # Table 1: R@10 first
    table = pd.read_csv(sweep / "models.csv")
    assert table["model"].tolist() == ["FREEDOM", "BPR"] and table["n"].tolist() == [2, 2]
    assert list(table.columns[1:6:2]) == ["R@10_mean", "N@10_mean", "R@20_mean"]
    assert table["s/epoch"].tolist() == pytest.approx([0.65, 0.23])
    assert "models (test metrics at the best validation epoch (mean ± std (n) over seeds)" in caplog.text


def test_dim_sweep_plot_with_seeds(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    num = 0
    for d in (16, 32, 64):
        for seed in (1, 2):
            write_job(sweep, num, [f"model.d={d}", f"seed={seed}"],
                      {"seed": seed, "model": {"d": d}, "graph": {"alpha": 0.7, "k_c": 10}},
                      metrics_of(0.05 + d / 1000 + seed / 100, 0.04 + d / 1000))
            num += 1
    run_summary(sweep, caplog)
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not (sweep / "heatmap.png").exists()
    cells = pd.read_csv(sweep / "summary_by_cell.csv")
    assert list(cells["model.d"]) == [16, 32, 64] and list(cells["n"]) == [2, 2, 2]
    assert cells["val/recall@20_std"].tolist() == pytest.approx([np.std([0.01, 0.02], ddof=1)] * 3)


def test_seeds_preset_becomes_the_seed_axis(tiny_dir):
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR, seed_axis
    from mllmrec.errors import ConfigError

    assert seed_axis(5) == "range(1,6)" and seed_axis(1) == "range(1,2)"
    for bad in (0, -2, 2.5, "3", True):
        with pytest.raises(ConfigError, match="seeds"):
            seed_axis(bad)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for exp, seeds, others in (("grid_seeds", [], {"graph.alpha", "graph.k_c"}),
                                   ("[ablation,grid_seeds]", ["seeds=3"], {"graph.alpha", "graph.k_c", "variant"})):
            cfg = compose("train", overrides=[f"experiment={exp}", *seeds], return_hydra_config=True)
            params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
            assert params["seed"] == ("range(1,4)" if seeds else "range(1,6)")
            assert set(params) == others | {"seed"}


def test_models_table_has_the_paired_t_test_against_mllmrec(tmp_path):
    """models.md: each model's two-sided paired t-test against MLLMRec on test R@20 over the seeds both
    ran (the hand formula: t = mean(d) / (sd(d) / sqrt(n)), p = 2 P(T_{n-1} > |t|))."""
    from scipy.stats import t as student_t

    from mllmrec.metrics import EvalSpec
    from mllmrec.sweep.cells import summarize_cells
    from mllmrec.sweep.tables import comparison_table, tables

    rng = np.random.default_rng(0)
    rows = []
    base = {"mllmrec": 0.09, "bpr": 0.088, "lightgcn": 0.12}
    for model, level in base.items():
        for seed in (999, 1, 2, 3):
            if model == "lightgcn" and seed == 3:
                continue  # a missing run: only the three seeds both have pair up
            rows.append({"job": f"{len(rows)}_x", "status": "completed", "model": model, "seed": seed,
                         "graph.alpha": 0.7, "graph.k_c": 10, "test/recall@20": level + rng.normal(0, 0.003),
                         "test/ndcg@20": 0.04, "test/recall@10": 0.05, "test/ndcg@10": 0.03,
                         "val/recall@20": level, "best_epoch": 10, "epochs": 30, "seconds_per_epoch": 0.4})
    jobs = pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # order must not matter: pairs are by seed
    key, stem, labels, metrics, reference = tables(EvalSpec.default())[1]
    comparison_table(summarize_cells(jobs), tmp_path, key, stem, labels, metrics, reference, jobs)
    table = pd.read_csv(tmp_path / "models.csv").set_index("model")
    column = "p vs MLLMRec (R@20)"

    def by_hand(model):
        x = jobs[jobs.model == model].set_index("seed")["test/recall@20"]
        r = jobs[jobs.model == "mllmrec"].set_index("seed")["test/recall@20"]
        d = (x - r).dropna()
        t_stat = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        return 2 * student_t.sf(abs(t_stat), len(d) - 1)

    assert table.loc["BPR", column] == pytest.approx(by_hand("bpr"), rel=1e-9)
    assert table.loc["LightGCN", column] == pytest.approx(by_hand("lightgcn"), rel=1e-9) and by_hand("lightgcn") < 0.05
    assert math.isnan(table.loc["MLLMRec", column])
    assert column in (tmp_path / "models.md").read_text().splitlines()[0]


def test_where_a_job_wrote_does_not_split_a_cell(tmp_path):
    """Two sweeps run apart (other output folders, one without a progress bar), joined: one cell per
    trained setting, its seeds pooled; a setting that changes training still splits."""
    from mllmrec.sweep.cells import summarize_cells
    from mllmrec.sweep.summary import collect

    sweep = tmp_path / "joined"
    runs = [(1, "out_a", "graph.alpha=0.4", 0.10), (2, "out_b", "graph.alpha=0.4", 0.14),
            (3, "out_b", "graph.alpha=0.6", 0.12)]
    for num, (seed, out, alpha, val) in enumerate(runs):
        ovs = [alpha, f"seed={seed}", f"paths.output_dir={out}", f"trainer.enable_progress_bar={num == 0}"]
        cfg = {"seed": seed, "graph": {"alpha": float(alpha.split("=")[1])}}
        write_job(sweep, num, ovs, cfg, metrics_of(val, val - 0.01))
    cells = summarize_cells(collect(sweep))
    assert len(cells) == 2 and "paths.output_dir" not in cells.columns
    pooled = cells[cells["graph.alpha"].astype(float) == 0.4].iloc[0]
    assert pooled["n"] == 2 and pooled["val/recall@20_mean"] == pytest.approx(0.12)
