"""The multimodal baselines through the real CLI: feature files as data, experiment=plug_in -m."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_module, tiny_overrides
from model_zoo import MODEL_CONFS, has_item_graph_refinement


def sweep_models(experiment: str) -> list[str]:
    """The ``model`` axis of conf/experiment/<experiment>.yaml, in its order."""
    params = yaml.safe_load((REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return [m.strip() for m in params["model"].split(",")]


def test_the_experiments_cover_every_model_and_every_item_graph_model():
    """baselines: every conf/model/*.yaml (Table 1); plug_in: every model with a refinable item graph
    (a ``refine`` setting, Figure 3). A new config must join them."""
    assert sorted(sweep_models("baselines")) == MODEL_CONFS
    assert sweep_models("baselines")[0] == "mllmrec"
    assert sorted(sweep_models("plug_in")) == [m for m in MODEL_CONFS if has_item_graph_refinement(m)]


@pytest.mark.slow
def test_vbpr_reads_the_feature_files_named_in_the_dataset_config(tiny_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    n_items = int(pd.read_csv(data / "tiny.inter", sep="\t")["itemID"].max()) + 1
    rng = np.random.default_rng(0)
    np.save(data / "text_feat.npy", rng.standard_normal((n_items, 8)).astype(np.float32))
    np.save(data / "image_feat.npy", rng.standard_normal((n_items, 5)).astype(np.float32))
    run = tmp_path / "run"
    base = tiny_overrides(tmp_path, "logger=none", "trainer.max_epochs=1", "model=vbpr", data_dir=data)
    proc = run_module("mllmrec.train", *base, "+dataset.features={text: text_feat.npy, image: image_feat.npy}",
                      f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 1 and 0 <= m["test/recall@20"] <= 1
    assert m["artifacts"] == {}  # the feature files replace the encode stage
    # a file with the wrong number of rows: one line naming it, exit status 2
    np.save(data / "image_feat.npy", np.ones((n_items - 1, 5), np.float32))
    bad = run_module("mllmrec.train", *base, "+dataset.features={image: image_feat.npy}",
                     f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert f"image_feat.npy: has {n_items - 1} rows but the dataset has {n_items} items" in bad.stderr


@pytest.mark.slow
def test_plug_in_experiment_writes_the_figure_3_chart(tiny_dir, tmp_path):
    """Two of the experiment's models (each model's refined graph has its own test; the list is held to
    conf/model above): vanilla and refined jobs, plug_in.csv and the chart."""
    sweep = tmp_path / "sweep"
    models = ["freedom", "gume"]
    proc = run_module("mllmrec.train", *tiny_overrides(tmp_path, "experiment=plug_in", f"model={','.join(models)}",
                                                       "trainer.max_epochs=1", "logger=none", data_dir=tiny_dir,
                                                       sweep=sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(sweep / "plug_in.csv")
    assert sorted(table["model"]) == models
    assert (table["vanilla runs"] == 1).all() and (table["refined runs"] == 1).all()
    assert (sweep / "plug_in.png").stat().st_size > 1000


def test_plug_in_table_means_over_seeds_and_gain():
    from mllmrec.sweep.plug_in import plug_in_table

    df = pd.DataFrame({
        "model": ["freedom"] * 4, "graph.refine": ["False", "False", "True", "True"], "status": ["completed"] * 4,
        "test/recall@20": [0.10, 0.12, 0.12, 0.13], "test/ndcg@20": [0.05, 0.05, 0.06, 0.06],
        "val/recall@20": [0.1, 0.1, 0.1, 0.1],
    })
    row = plug_in_table(df).iloc[0]
    assert abs(row["vanilla test/recall@20"] - 0.11) < 1e-12
    assert abs(row["refined test/recall@20"] - 0.125) < 1e-12
    assert abs(row["R@20 gain %"] - 100 * (0.125 / 0.11 - 1)) < 1e-9
    assert row["vanilla test/recall@20 std"] == pytest.approx(np.std([0.10, 0.12], ddof=1))
    assert row["refined test/recall@20 std"] == pytest.approx(np.std([0.12, 0.13], ddof=1))


@pytest.mark.slow
def test_baselines_experiment_writes_table_one(tiny_dir, tmp_path):
    """experiment=baselines: one job per model at the configured alpha/K_c (not the grid), and
    models.md with a row per model. Three of its models (every model trains through the CLI in
    test_every_model.py; the experiment's list is held to conf/model above)."""
    from mllmrec.sweep.tables import MODEL_LABELS

    sweep = tmp_path / "sweep"
    models = ["mllmrec", "lightgcn", "gume"]
    proc = run_module("mllmrec.train", *tiny_overrides(tmp_path, "experiment=baselines", f"model={','.join(models)}",
                                                       "trainer.max_epochs=1", "logger=none", data_dir=tiny_dir,
                                                       sweep=sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["model"]) == sorted(models)
    assert (summary["status"] == "completed").all()
    table = pd.read_csv(sweep / "models.csv")
    assert table["model"].tolist() == [MODEL_LABELS[m] for m in models]
    assert table["n"].tolist() == [1] * len(models) and table["s/epoch"].gt(0).all()
    rows = [ln for ln in (sweep / "models.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 1 + len(models)
