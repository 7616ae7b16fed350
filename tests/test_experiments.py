"""Paper experiments: each ablation switch changes the computation; baselines; recommend; t-SNE."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_module, tiny_overrides


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("exp")


def inputs_for(tiny_dir, out, *overrides):
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR
    from mllmrec.pipeline import build_inputs

    base = tiny_overrides(out, "graph.alpha=0.8", data_dir=tiny_dir)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides), return_hydra_config=False)
    return cfg, build_inputs(cfg)


@pytest.fixture(scope="module")
def full(tiny_dir, shared_out):
    return inputs_for(tiny_dir, shared_out)


@pytest.mark.parametrize("variant", ["wo_gd", "wo_te", "wo_gcn_ii"])
def test_graph_switches_change_the_item_inputs(tiny_dir, shared_out, full, variant):
    _, base = full
    _, other = inputs_for(tiny_dir, shared_out, f"variant={variant}")
    assert not np.allclose(base.item_features, other.item_features)
    np.testing.assert_array_equal(base.user_features, other.user_features)
    assert other.artifacts["graph"].key != base.artifacts["graph"].key


def test_wo_rs_replaces_the_user_inputs_only(tiny_dir, shared_out, full):
    _, base = full
    _, other = inputs_for(tiny_dir, shared_out, "variant=wo_rs")
    assert other.user_features.shape == base.user_features.shape
    assert not np.allclose(base.user_features, other.user_features)
    np.testing.assert_array_equal(base.item_features, other.item_features)
    assert "encode/users" not in other.artifacts and "reason" not in other.artifacts


def test_gcn_ui_changes_the_representations(tiny_dir, shared_out, full):
    from mllmrec.pipeline import build_model

    cfg, inputs = full
    plain = build_model(cfg, inputs)
    cfg_ui, _ = inputs_for(tiny_dir, shared_out, "variant=w_gcn_ui")
    with_ui = build_model(cfg_ui, inputs)
    with_ui.load_state_dict(plain.state_dict())  # same weights: only the computation differs
    with torch.no_grad():
        hu0, hi0 = plain.representations()
        hu1, hi1 = with_ui.representations()
    assert not torch.allclose(hu0, hu1) and not torch.allclose(hi0, hi1)
    # the propagated part: sum over layers 0..2 of the normalised graph applied to normalised h
    z = torch.nn.functional.normalize(torch.cat([hu0, hi0]))
    dense = torch.from_numpy(with_ui.ui_adj.csr.toarray())
    expected = z + dense @ z + dense @ (dense @ z)
    torch.testing.assert_close(torch.cat([hu1 - hu0, hi1 - hi0]), expected, rtol=1e-4, atol=1e-5)


def train_one_epoch(tiny_dir, out, model: str):
    """``python -m mllmrec.train model=<model>`` for one epoch on the tiny fixture; its run dir."""
    run = out / model
    proc = run_module("mllmrec.train", *tiny_overrides(out, f"model={model}", "trainer.max_epochs=1", "logger=none",
                                                       data_dir=tiny_dir, run=run), cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def bpr_run(tiny_dir, shared_out):
    return train_one_epoch(tiny_dir, shared_out, "bpr")


@pytest.mark.slow
def test_bpr_one_epoch(bpr_run):
    m = json.loads((bpr_run / "metrics.json").read_text())
    assert m["epochs"] == 1 and 0 <= m["test/recall@20"] <= 1
    assert "encode" not in json.dumps(m["artifacts"])  # ID baselines skip the text stages


@pytest.mark.slow
def test_lightgcn_one_epoch(tiny_dir, shared_out):
    run = train_one_epoch(tiny_dir, shared_out, "lightgcn")
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 1 and 0 <= m["test/recall@20"] <= 1


@pytest.mark.slow
def test_recommend_excludes_train_items_and_returns_k(tiny_dir, tiny_data, bpr_run):
    proc = run_module("mllmrec.recommend", f"run_dir={bpr_run}", "topk=5", cwd=bpr_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = pd.read_parquet(bpr_run / "recommendations.parquet")
    assert set(recs.columns) >= {"userID", "rank", "itemID", "score", "title"}
    counts = recs.groupby("userID").size()
    assert len(counts) == tiny_data.n_users and (counts == 5).all()
    train = tiny_data.train_matrix
    assert not any(train[u, i] for u, i in zip(recs["userID"], recs["itemID"]))
    for _, g in recs.groupby("userID"):
        assert list(g["rank"]) == [1, 2, 3, 4, 5] and g["score"].is_monotonic_decreasing
    assert (recs["title"] != "").all()
    assert "top-5 recommendations" in proc.stdout

    one = run_module("mllmrec.recommend", f"run_dir={bpr_run}", "topk=3", "user=7", cwd=bpr_run)
    assert one.returncode == 0 and "user 7:" in one.stdout
    assert set(pd.read_parquet(bpr_run / "recommendations.parquet")["userID"]) == {7}


@pytest.mark.slow
def test_visualize_writes_a_tsne_png(bpr_run):
    proc = run_module("mllmrec.visualize", f"run_dir={bpr_run}", "n_users=30", cwd=bpr_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (bpr_run / "tsne_users.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xy = np.load(bpr_run / "tsne_users.npz")["xy"]
    assert xy.shape == (30, 2) and np.isfinite(xy).all()


@pytest.mark.slow
@pytest.mark.parametrize("era", ["before_optimizer", "before_zoo"])
def test_a_run_dir_of_an_older_model_config_reopens(bpr_run, tmp_path, era):
    """Run dirs written by older versions still load: before the model zoo (``_target_``
    ``mllmrec.baselines.BPRModule``) and, before that, before ``model.optimizer`` (``model.lr``,
    ``needs_features``)."""
    import shutil

    import torch
    from omegaconf import OmegaConf

    from mllmrec.runs import load_run

    old = tmp_path / "old_run"
    shutil.copytree(bpr_run, old)
    cfg = OmegaConf.load(old / ".hydra" / "config.yaml")
    model = OmegaConf.to_container(cfg.model, resolve=False)
    model["_target_"] = "mllmrec.baselines.BPRModule"
    optimizer = dict(model["optimizer"])
    if era == "before_optimizer":
        model.pop("optimizer")
        model.update(needs_features=False, lr=optimizer["lr"] * 3, weight_decay=0.5)
    cfg.model = OmegaConf.create(model)
    OmegaConf.save(cfg, old / ".hydra" / "config.yaml")

    new_run, old_run = load_run(bpr_run), load_run(old)
    assert old_run.cfg.model._target_ == "mllmrec.models.bpr.BPRModule"
    if era == "before_optimizer":
        assert old_run.cfg.model.optimizer.lr == optimizer["lr"] * 3 and old_run.cfg.model.optimizer.weight_decay == 0.5
        assert "needs_features" not in old_run.cfg.model
    else:
        assert OmegaConf.to_container(old_run.cfg.model.optimizer) == optimizer
    for a, b in zip(new_run.model.representations(), old_run.model.representations()):
        assert torch.equal(a, b)
    proc = run_module("mllmrec.recommend", f"run_dir={old}", "topk=3", "user=2", cwd=old)
    assert proc.returncode == 0 and "user 2:" in proc.stdout, proc.stderr[-2000:]
