"""Every model's training-loss gradient against central finite differences of the same loss (issue 31):
a bug that changes only the gradients (a stop-gradient in one branch) leaves every value test green and
fails here. One test per ``conf/model/<name>.yaml`` (a new config is covered without editing this file),
built as a run builds it (``pipeline.build_model``), on a tiny two-modality case in float64, with the
model's randomness (dropout, noise, pruned edges, Gumbel draws) the same for every loss evaluation.

A parameter the loss does not reach must be declared by the model (``unreached_parameters``): declared
ones get no gradient, every other one a nonzero gradient somewhere (:func:`gradients.check_reach`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradients import assert_gradients_match, autograd_gradients, check_reach, fixed_randomness_loss
from mm_planted import planted_data
from model_zoo import MODEL_CONFS, gradient_overrides, model_class, small_overrides

from mllmrec.models.base import Inputs


def small_case():
    """24 users x 20 items in 2 clusters, text (16-d) and image (12-d) features."""
    return planted_data(n_clusters=2, users_per=12, items_per=10, per_user=6, modalities=("text", "image"))


def batch_of(data, size=12, seed=0):
    """Training (user, positive) pairs with a repeated user and a repeated positive, random negatives."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(data.split == 0)
    pick = rng.choice(train, size - 2, replace=False)
    pick = np.concatenate([pick, pick[:1], pick[1:2]])  # the same (user, item) twice, and another again
    users, pos = data.users[pick], data.items[pick]
    neg = rng.integers(0, data.n_items, size)
    return tuple(torch.from_numpy(np.asarray(x, np.int64)) for x in (users, pos, neg))


def inputs_for(name, data, mods) -> Inputs:
    if model_class(name).needs == "features":  # MLLMRec: encoded user preferences and propagated items
        rng = np.random.default_rng(1)
        return Inputs(data, user_features=rng.standard_normal((data.n_users, 10)).astype(np.float32),
                      item_features=rng.standard_normal((data.n_items, 14)).astype(np.float32))
    return Inputs(data, modalities=mods)


def built(compose_cfg, name, modalities=("text", "image")):
    from mllmrec.pipeline import build_model

    data, mods = small_case()
    mods = {m: mods[m] for m in modalities}
    cfg = compose_cfg(f"model={name}", *small_overrides(name), *gradient_overrides(name))
    torch.manual_seed(0)
    model = build_model(cfg, inputs_for(name, data, mods)).double().train()
    return model, data


@pytest.mark.parametrize("name", MODEL_CONFS)
def test_training_loss_gradients_match_finite_differences(compose_cfg, name):
    model, data = built(compose_cfg, name)
    with torch.no_grad():  # 24 users, 20 items: a table sized by the other count (a swap) shows here
        h_u, h_i = model.representations()
    assert (h_u.shape[0], h_i.shape[0]) == (data.n_users, data.n_items)
    batch = batch_of(data)
    loss = lambda: fixed_randomness_loss(model, batch)  # noqa: E731
    first, again = loss().item(), loss().item()
    assert first == again, "the loss is not deterministic under a fixed seed: finite differences are meaningless"
    grads = autograd_gradients(model, loss)
    check_reach(model, grads)
    with torch.no_grad():
        checked = assert_gradients_match(model, grads, lambda: loss().item())
    assert checked == sum(min(5, g.numel()) for g in grads.values() if g is not None)  # every reached one sampled


@pytest.mark.parametrize("name", [n for n in MODEL_CONFS if model_class(n).needs == "modalities"])
def test_one_modality_declares_the_parameters_it_leaves_out(compose_cfg, name):
    """With the text modality alone some models create parameters they do not use (SOIL's fuser and
    image map, LATTICE's modality weight): declared, they get no gradient; every other one does."""
    model, data = built(compose_cfg, name, modalities=("text",))
    check_reach(model, autograd_gradients(model, lambda: fixed_randomness_loss(model, batch_of(data))))
