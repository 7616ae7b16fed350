"""Leakage guard for the multimodal baselines (issue 17 audit).

Everything a baseline builds from the data (the user-item graph, FREEDOM's pruning
probabilities, the item-item kNN and refined graphs, LGMRec's user means and hypergraph
memberships) must come from the training interactions only. Two datasets that differ only in
their validation and test interactions must therefore give the same model, built through
``train.build_model`` as a run builds it, and the same weights after a training epoch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mm_planted import planted_data
from model_zoo import MODEL_CONFS, has_item_graph_refinement, model_class, planted_overrides, small_overrides


def heldout_moved(data):
    """The same dataset with every validation/test interaction moved to another item."""
    items = data.items.copy()
    held = data.split != 0
    items[held] = (items[held] + data.n_items // 2) % data.n_items
    return dataclasses.replace(data, items=items)


def built_and_trained(compose_cfg, overrides, data, mods):
    from mllmrec.datamodule import RecDataModule
    from mllmrec.models.base import Inputs
    from mllmrec.pipeline import build_model

    cfg = compose_cfg(*overrides)
    torch.manual_seed(0)
    model = build_model(cfg, Inputs(data, modalities=mods))
    built = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    built.update({f"buffer:{k}": v.clone() for k, v in model.named_buffers()})  # non-persistent too
    torch.manual_seed(1)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(
        model, datamodule=RecDataModule(batch_size=64, seed=1).attach(data))
    return built, {k: v.clone() for k, v in model.state_dict().items()}


def leakage_cases():
    """Every model that builds from the interactions (needs ``ids`` or ``modalities``), and its
    refined-graph form where ``graph.refine`` applies; two modalities (text and image)."""
    cases = []
    for name in MODEL_CONFS:
        if model_class(name).needs == "features":  # MLLMRec: the reason stage's leakage tests (test_pipeline)
            continue
        base = [*small_overrides(name), *planted_overrides(name)]
        cases.append(pytest.param([f"model={name}", *base], id=name))
        if has_item_graph_refinement(name):
            cases.append(pytest.param([f"model={name}", "graph.refine=true", *base], id=f"{name}-refined"))
    return cases


@pytest.mark.parametrize("overrides", leakage_cases())
def test_models_do_not_see_heldout_interactions(compose_cfg, overrides):
    data, mods = planted_data(modalities=("text", "image"))
    moved = heldout_moved(data)
    assert (moved.items != data.items).sum() == (data.split != 0).sum() > 0
    np.testing.assert_array_equal(moved.train_matrix.toarray(), data.train_matrix.toarray())
    built_a, trained_a = built_and_trained(compose_cfg, overrides, data, mods)
    built_b, trained_b = built_and_trained(compose_cfg, overrides, moved, mods)
    assert built_a.keys() == built_b.keys()
    for name in built_a:
        torch.testing.assert_close(built_a[name], built_b[name], rtol=0, atol=0, msg=name)
    for name in trained_a:
        torch.testing.assert_close(trained_a[name], trained_b[name], rtol=0, atol=0, msg=name)
