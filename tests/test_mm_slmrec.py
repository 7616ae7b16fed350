"""SLMRec against a dense float64 re-derivation of MMRec's ``src/models/slmrec.py`` (written from the
official code: three separate LightGCN views, concat fusion, ``infonce`` and ``fac``), its starting
weights against MMRec's construction order, its configs, and learning on planted structure."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from mm_planted import planted_data, val_recall_before_after
from model_inputs import inputs_of
from model_zoo import has_item_graph_refinement
from torch import nn

from mllmrec.models.base import Inputs, adam

N_USERS, N_ITEMS, D = 4, 5, 4
TEMP, SSL_TEMP, SSL_ALPHA = 0.2, 0.5, 0.3
# MMRec's parameter names for ours
MMREC_NAME = {"user_emb": "embedding_user.weight", "item_emb": "embedding_item.weight",
              "user_fuse.weight": "embedding_user_after_GCN.weight", "user_fuse.bias": "embedding_user_after_GCN.bias",
              "item_fuse.weight": "embedding_item_after_GCN.weight", "item_fuse.bias": "embedding_item_after_GCN.bias",
              "dense.image.weight": "v_dense.weight", "dense.image.bias": "v_dense.bias",
              "dense.text.weight": "t_dense.weight", "dense.text.bias": "t_dense.bias"}


def mmrec_name(ours: str) -> str:
    return MMREC_NAME.get(ours) or ours.replace("fac.", "g_")


def hand_case(modalities=("text", "image")):
    """4 users x 5 items (item 4 has no training interaction), 3-d text and 5-d image features of
    different norms, a batch that repeats user 0 and item 2."""
    rng = np.random.default_rng(5)
    train = np.zeros((N_USERS, N_ITEMS), np.float32)
    for u, items in enumerate([[0, 1], [1, 2], [0, 3], [2, 3]]):
        train[u, items] = 1
    feats = {"text": (rng.standard_normal((N_ITEMS, 3)) * [[1], [3], [0.5], [2], [1]]).astype(np.float32),
             "image": (rng.standard_normal((N_ITEMS, 5)) * 2).astype(np.float32)}
    batch = (torch.tensor([0, 1, 2, 0, 3]), torch.tensor([1, 2, 3, 0, 2]), torch.tensor([2, 3, 1, 4, 0]))
    return train, {m: feats[m] for m in modalities}, batch


def build(train, mods, seed=0, **kw):
    from mllmrec.models.slmrec import SLMRecModule

    torch.manual_seed(seed)
    return SLMRecModule(inputs_of(sp.csr_matrix(train), modalities=mods), d=D, layers=3, temp=TEMP,
                        ssl_temp=SSL_TEMP, ssl_alpha=SSL_ALPHA, **kw)


def official(train, mods, p, users, pos):
    """MMRec's ``compute`` / ``infonce`` / ``fac`` densely in float64 (p: MMRec's parameter names).
    Returns (user, item, loss); the single-modality guards are those of the patched official run."""
    f64 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    r = f64(train)
    adj = torch.zeros(N_USERS + N_ITEMS, N_USERS + N_ITEMS, dtype=torch.float64)
    adj[:N_USERS, N_USERS:], adj[N_USERS:, :N_USERS] = r, r.T
    dinv = (adj.sum(1) + 1e-8) ** -0.5
    adj = dinv[:, None] * adj * dinv[None, :]

    def compute_graph(u, i):
        e = torch.cat([u, i])
        embs = [e]
        for _ in range(3):
            e = adj @ e
            embs.append(e)
        out = torch.stack(embs, 1).mean(1)
        return out[:N_USERS], out[N_USERS:]

    def linear(name, x):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    eu, ei = p["embedding_user.weight"], p["embedding_item.weight"]
    views = {"i": compute_graph(eu, ei)}
    for key, m in (("v", "image"), ("t", "text")):
        if m in mods:
            f = f64(mods[m])
            views[key] = compute_graph(eu, linear(f"{key}_dense", f / f.norm(dim=1, keepdim=True)))
    user = linear("embedding_user_after_GCN", torch.cat([v[0] for v in views.values()], 1))
    item = linear("embedding_item_after_GCN", torch.cat([v[1] for v in views.values()], 1))

    def ce(logits):  # nn.CrossEntropyLoss with labels arange(B), mean reduction, written out
        return -(logits.diagonal() - torch.log(torch.exp(logits).sum(1))).mean()

    un = user[users] / user[users].norm(dim=1, keepdim=True)
    pn = item[pos] / item[pos].norm(dim=1, keepdim=True)
    main = ce(un @ pn.T / TEMP)
    x_i_iv = linear("g_i_iv", views["i"][1][pos])
    fac = 0.0
    if "v" in views:
        fac = fac + ce(x_i_iv @ linear("g_v_iv", views["v"][1][pos]).T / SSL_TEMP)
    if "t" in views:
        x_iva_ivat = linear("g_iva_ivat", linear("g_iv_iva", x_i_iv))
        fac = fac + ce(x_iva_ivat @ linear("g_t_ivat", views["t"][1][pos]).T / SSL_TEMP)
    return user, item, main + SSL_ALPHA * fac


def official_params(model):
    return {mmrec_name(k): v.detach().double().clone().requires_grad_(True) for k, v in model.named_parameters()}


@pytest.mark.parametrize("modalities", [("text", "image"), ("text",), ("image",)], ids=["two", "text", "image"])
def test_forward_loss_and_gradients_match_the_official_equations(modalities):
    train, mods, (users, pos, neg) = hand_case(modalities)
    model = build(train, mods)
    p = official_params(model)
    user, item, loss = official(train, mods, p, users, pos)
    got_u, got_i = model.representations()  # ranking: the UNnormalised fused embeddings
    torch.testing.assert_close(got_u.double(), user.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_i.double(), item.detach(), rtol=1e-5, atol=1e-6)
    got = model.batch_loss(users, pos, neg)
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    got.backward()
    loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.double(), p[mmrec_name(name)].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_negative_is_unused():
    train, mods, (users, pos, neg) = hand_case()
    model = build(train, mods)
    a = model.batch_loss(users, pos, neg)
    for other in ([4, 4, 4, 4, 4], [0, 1, 0, 2, 3]):  # not a permutation of neg (in-batch losses are invariant to those)
        assert torch.equal(a, model.batch_loss(users, pos, torch.tensor(other)))


@pytest.mark.parametrize("modalities, heads", [
    (("text", "image"), {"i_iv", "v_iv", "iv_iva", "iva_ivat", "t_ivat"}),
    (("text",), {"i_iv", "iv_iva", "iva_ivat", "t_ivat"}),
    (("image",), {"i_iv", "v_iv"})], ids=["two", "text", "image"])
def test_every_parameter_is_used_and_one_line_names_what_one_modality_leaves_out(caplog, modalities, heads):
    train, mods, (users, pos, neg) = hand_case(modalities)
    with caplog.at_level(logging.INFO, logger="mllmrec.models.slmrec"):
        model = build(train, mods)
    notes = [r.getMessage() for r in caplog.records if r.name == "mllmrec.models.slmrec"]
    assert len(notes) == (0 if len(modalities) == 2 else 1) and all("\n" not in n for n in notes)
    if modalities == ("text",):
        assert "ID<->visual term is left out" in notes[0]
    assert set(model.fac) == heads
    model.batch_loss(users, pos, neg).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def mmrec_starting_weights(seed, n_users, n_items, mods, d):
    """MMRec's ``SLMRec.__init__`` draws (``create_u_embeding_i``, then the FAC heads), by its names."""
    torch.manual_seed(seed)
    eu, ei = nn.Embedding(n_users, d), nn.Embedding(n_items, d)
    nn.init.xavier_uniform_(eu.weight, gain=1)
    nn.init.xavier_uniform_(ei.weight, gain=1)
    layers = {}
    for key, m in (("v", "image"), ("t", "text")):
        if m in mods:
            layers[f"{key}_dense"] = nn.Linear(mods[m].shape[1], d)
            nn.init.xavier_uniform_(layers[f"{key}_dense"].weight)
    width = d * (len(mods) + 1)
    layers["embedding_item_after_GCN"] = nn.Linear(width, d)
    layers["embedding_user_after_GCN"] = nn.Linear(width, d)
    nn.init.xavier_uniform_(layers["embedding_item_after_GCN"].weight)
    nn.init.xavier_uniform_(layers["embedding_user_after_GCN"].weight)
    for name in ("g_i_iv", "g_v_iv", "g_iv_iva", "g_a_iva"):
        layers[name] = nn.Linear(d, d)
    layers["g_iva_ivat"], layers["g_t_ivat"] = nn.Linear(d, d // 2), nn.Linear(d, d // 2)
    for name in ("g_i_iv", "g_v_iv", "g_iv_iva", "g_a_iva", "g_iva_ivat", "g_t_ivat"):
        nn.init.xavier_uniform_(layers[name].weight)
    out = {"embedding_user.weight": eu.weight, "embedding_item.weight": ei.weight}
    out.update({f"{n}.{k}": v for n, layer in layers.items() for k, v in layer.state_dict().items()})
    return out


@pytest.mark.parametrize("modalities", [("text", "image"), ("text",)], ids=["two", "text"])
def test_starting_weights_are_mmrecs_for_the_same_seed(modalities):
    train, mods, _ = hand_case(modalities)
    model = build(train, mods, seed=999)
    ref = mmrec_starting_weights(999, N_USERS, N_ITEMS, mods, D)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), ref[mmrec_name(name)]), name


def test_config_defaults_search_grid_and_refine_refused(compose_cfg):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mllmrec.config import CONF_DIR
    from mllmrec.errors import ConfigError
    from mllmrec.pipeline import build_model

    data, mods = planted_data(modalities=("text", "image"))
    model = build_model(compose_cfg("model=slmrec"), Inputs(data, modalities=mods))
    group = model.configure_optimizers().param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.0001)
    assert dict(model.hparams) == {"d": 64, "layers": 3, "temp": 0.2, "ssl_temp": 0.2, "ssl_alpha": 0.1,
                                   "graph_refine": False}
    with pytest.raises(ConfigError, match="'graph.refine'.*no item-item graph") as err:
        build_model(compose_cfg("model=slmrec", "graph.refine=true"), Inputs(data, modalities=mods))
    assert "\n" not in str(err.value)
    assert not has_item_graph_refinement("slmrec")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=search_slmrec"], return_hydra_config=True)
    assert cfg.model._target_ == "mllmrec.models.slmrec.SLMRecModule"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    axes = {k: str(v).split(",") for k, v in params.items() if k not in ("graph.alpha", "graph.k_c")}
    assert axes == {"model.optimizer.lr": ["0.0001", "0.001", "0.01", "0.1"],
                    "model.ssl_temp": ["0.1", "0.2", "0.5", "1.0"],
                    "model.ssl_alpha": ["0.01", "0.05", "0.1", "0.5", "1.0"]}
    assert len(list(itertools.product(*axes.values()))) == 80


def test_learns_planted_structure():
    from mllmrec.models.slmrec import SLMRecModule

    data, mods = planted_data(modalities=("text", "image"))
    torch.manual_seed(0)
    model = SLMRecModule(Inputs(data, modalities=mods), adam(lr=0.01, weight_decay=1e-4), d=16)
    before, after = val_recall_before_after(model, data)
    assert after > before + 0.2 and after > 0.9, (before, after)
