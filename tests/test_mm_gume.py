"""GUME against a dense re-derivation of the official code (tests/gume_reference.py: dense I x I
similarities, ``find_inter`` as a loop over top-k lists, float64): graphs, forward and every loss term;
the variable-degree graph enhancement, the single-modality form, the refinement switch and learning on
planted structure."""

from __future__ import annotations

import logging

import gume_reference as ref
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from gradients import assert_gradients_match, distinct_settings, every_entry
from mm_planted import planted_data, val_recall_before_after
from model_inputs import inputs_of
from test_mm_soil import hand_case as soil_hand_case

from mllmrec.errors import ConfigError
from mllmrec.models import gume
from mllmrec.models.base import Inputs, adam

KNN_K = 3
# distinct within each kind, so that a swap of two weights or of the two temperatures changes the loss
WEIGHTS = distinct_settings(weights={"bm_loss": 0.3, "um_loss": 0.7, "vt_loss": 0.5, "reg_weight_1": 0.2,
                                     "reg_weight_2": 0.6}, temperatures={"bm_temp": 0.4, "um_temp": 0.3})
LAYERS = distinct_settings(layers={"n_ui_layers": 3, "n_layers": 2})
BATCH = (np.array([0, 1, 3, 3, 5]), np.array([1, 2, 0, 3, 4]), np.array([4, 3, 2, 4, 0]))


def hand_case():
    """SOIL's case (two modalities at chosen angles, signed text cosines) with user 5 also on item 4 and a
    seventh user without history: the top-3 lists differ between the modalities (the enhancement edges
    are a strict, asymmetric subset of either graph); no top-k tie."""
    train, feats = soil_hand_case()
    train = np.vstack([train, np.zeros((1, 5))])
    train[5, 4] = 1
    return train, feats


def build(train, feats, **kw):
    torch.manual_seed(0)
    mods = {m: np.asarray(f, np.float32) for m, f in feats.items()}
    return gume.GUMEModule(inputs_of(sp.csr_matrix(train), modalities=mods), d=4, knn_k=KNN_K, **kw)


def reference_graphs(train, feats):
    mods = [m for m in ("image", "text") if m in feats]
    built = {m: ref.knn_normalized_graph(ref.build_sim(feats[m]), KNN_K) for m in mods}
    inter = ref.find_inter([built[m][1] for m in mods])
    adj, r = ref.get_adj_mat(train, inter)
    return adj, r, {m: built[m][0] for m in mods}, inter


def official_params(model) -> dict:
    """The model's parameters under the official code's names, float64."""
    out = {}
    renames = [("user_emb", "user_embedding.weight"), ("item_emb", "item_id_embedding.weight")]
    for m in model.mods:
        renames += [(f"ext_user.{m}", f"extended_{m}_user.weight"), (f"feat.{m}", f"{m}_embedding.weight"),
                    (f"space.{m}.0", f"{m}_reduce_dim"), (f"space.{m}.1", f"{m}_trans_dim.0"),
                    (f"behavior.{m}.0", f"{m}_behavior.0")]
    renames.append(("coarse.", "separate_coarse."))
    for name, value in model.named_parameters():
        for a, b in renames:
            if name == a or name.startswith(a + ".") or (a.endswith(".") and name.startswith(a)):
                name = b + name[len(a):]
                break
        out[name] = value.detach().double().numpy()
    return out


def assert_same_graph(got: sp.spmatrix, expected: np.ndarray):
    got = got.toarray()
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def fake_noise():
    """A deterministic stand-in for ``torch.rand_like``: elementwise in x, different on every call (so
    drawing for the batch's rows or for the whole table gives the same perturbation)."""
    calls = {"torch": 0, "numpy": 0}

    def draw(x, kind, sin):
        calls[kind] += 1
        return 0.5 + 0.4 * sin(7.0 * calls[kind] * x + calls[kind])

    return (lambda x: draw(x, "torch", torch.sin)), (lambda x: draw(x, "numpy", np.sin))


def test_graphs_match_the_official_code():
    train, feats = hand_case()
    adj, r, g, inter = reference_graphs(train, feats)
    assert any(inter.values()) and sum(map(len, inter.values())) < 5 * (KNN_K - 1)  # a strict subset
    assert any(i not in inter[j] for i, vs in inter.items() for j in vs)  # not symmetric
    assert (g["text"] < 0).any() and not np.isnan(adj).any()
    model = build(train, feats)
    for m in ("image", "text"):
        assert_same_graph(model.item_graph[m].to_scipy(), g[m])
    assert_same_graph(model.ui_graph.to_scipy(), adj)
    assert_same_graph(model.r_graph.to_scipy(), r)


def test_forward_and_loss_match_the_official_equations(monkeypatch):
    train, feats = hand_case()
    adj, r, g, _ = reference_graphs(train, feats)
    model = build(train, feats, batch_size=8, **WEIGHTS)
    # move the features off their initial values: the graphs stay, the features are trainable parameters
    with torch.no_grad():
        for m in model.mods:
            model.feat[m].add_(0.1 * torch.randn_like(model.feat[m]))
    views = ref.forward(official_params(model), (adj, r, g))
    got = model.embed()
    for k, expected in views.items():
        np.testing.assert_allclose(got[k].detach().numpy(), expected, rtol=1e-4, atol=1e-6, err_msg=k)
    torch_noise, numpy_noise = fake_noise()
    monkeypatch.setattr(gume, "uniform_like", torch_noise)
    expected = ref.loss(views, 7, BATCH, WEIGHTS, numpy_noise, batch_size=8)
    loss = model.batch_loss(*(torch.from_numpy(x) for x in BATCH))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is trained (features too)


def test_gradients_match_the_official_equations(monkeypatch):
    """Every parameter entry's gradient (features included) against central differences of the official
    loss (float64), with the same perturbation draws for every evaluation: a stop-gradient in one branch
    leaves the values above unchanged and fails here."""
    train, feats = hand_case()
    adj, r, g, _ = reference_graphs(train, feats)
    model = build(train, feats, batch_size=8, **WEIGHTS, **LAYERS)
    with torch.no_grad():
        for m in model.mods:
            model.feat[m].add_(0.1 * torch.randn_like(model.feat[m]))
    monkeypatch.setattr(gume, "uniform_like", fake_noise()[0])
    model.batch_loss(*(torch.from_numpy(x) for x in BATCH)).backward()
    p = official_params(model)
    grads = {key: param.grad.double() for key, (_, param) in zip(p, model.named_parameters())}

    def official_loss():  # fresh noise counters: every evaluation draws what the model's step drew
        views = ref.forward(p, (adj, r, g), **LAYERS)
        return ref.loss(views, 7, BATCH, WEIGHTS, fake_noise()[1], batch_size=8)

    params = {k: torch.from_numpy(v) for k, v in p.items()}  # views: perturbing them perturbs p
    checked = assert_gradients_match(model, grads, official_loss, rtol=1e-3, atol=1e-6, params=params,
                                     entries=every_entry, what="the official loss's central difference")
    assert checked == sum(param.numel() for param in model.parameters())


def test_noise_terms_draw_fresh_perturbations():
    train, feats = hand_case()
    model = build(train, feats)
    users = torch.tensor([0, 1, 1, 3])
    table = model.embed()["integ"][:7].detach()
    torch.manual_seed(0)
    first = gume.noise_nce(table, users, 0.1)
    assert first.item() != pytest.approx(gume.noise_nce(table, users, 0.1).item(), rel=1e-9)
    x = torch.tensor([[0.5, -2.0, 0.0]])
    step = gume.perturb(x) - x
    assert torch.all(step[0, :2] * x[0, :2] > 0) and step[0, 2] == 0  # away from 0 along sign(x)
    assert torch.linalg.vector_norm(step) <= 0.1 + 1e-7


def test_enhancement_edges_handle_rows_of_any_degree():
    """Variable degree (a refined graph): P = neighbours in both graphs, without the item itself."""
    a = sp.csr_matrix(np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1]], np.float32) * 0.3)
    b = sp.csr_matrix(np.array([[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 1]], np.float32) * 0.7)
    p = gume.enhancement_edges([a, b]).toarray()
    np.testing.assert_array_equal(p, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    single = gume.enhancement_edges([a]).toarray()
    np.testing.assert_array_equal(single, (a.toarray() != 0) & ~np.eye(4, dtype=bool))


def test_single_modality_form(caplog):
    train, feats = hand_case()
    text = {"text": feats["image"]}
    adj, r, g, inter = reference_graphs(train, text)
    with caplog.at_level(logging.INFO, logger="mllmrec.models.gume"):
        model = build(train, text, **WEIGHTS)
    assert [rec.message for rec in caplog.records if "one modality" in rec.message] == [
        "GUME with one modality (text): graph enhancement from its own kNN graph, no fuser and no vt alignment "
        "term, integration = x_text / 2, extended_it = extended_text"]
    assert all(inter[i] == sorted(set(ref.knn_normalized_graph(ref.build_sim(text["text"]), KNN_K)[1][i]) - {i})
               for i in inter)
    assert_same_graph(model.ui_graph.to_scipy(), adj)
    views = ref.forward(official_params(model), (adj, r, g))
    got = model.embed()
    np.testing.assert_allclose(views["integ"], views["x_text"] / 2)
    for k in ("final", "ext_it"):
        np.testing.assert_allclose(got[k].detach().numpy(), views[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_knn_k_beyond_the_items_is_a_one_line_error():
    train, feats = hand_case()
    with pytest.raises(ConfigError, match=r"model.knn_k.*must be in \[1, 5\]"):
        gume.GUMEModule(inputs_of(sp.csr_matrix(train), modalities={m: f.astype(np.float32) for m, f in feats.items()}),
                        knn_k=6)


def test_refine_changes_exactly_the_item_graphs():
    """graph.refine=true: each G_m is the refined graph on the same candidates; the enhancement edges are
    recomputed from them; parameters and everything else unchanged."""
    from mllmrec.models.knn_graphs import model_item_graph

    train, feats = hand_case()
    cfg = {"refine": True, "alpha": 0.5, "k_c": 1, "denoise": True, "enhance": True}
    vanilla, refined = build(train, feats), build(train, feats, **cfg)
    csr = sp.csr_matrix(train, dtype=np.float32)
    graphs = {}
    for m in ("image", "text"):
        graphs[m] = model_item_graph(feats[m].astype(np.float32), KNN_K, csr, cfg)
        assert_same_graph(refined.item_graph[m].to_scipy(), graphs[m].toarray())
        assert not np.allclose(refined.item_graph[m].to_scipy().toarray(), vanilla.item_graph[m].to_scipy().toarray())
    expected = gume.enhanced_ui_graph(csr, gume.enhancement_edges(list(graphs.values())))
    assert_same_graph(refined.ui_graph.to_scipy(), expected.toarray())
    n_users = train.shape[0]
    unrefined = gume.enhanced_ui_graph(csr, gume.enhancement_edges([vanilla.item_graph[m].to_scipy() for m in
                                                                    ("image", "text")]))
    assert_same_graph(vanilla.ui_graph.to_scipy(), unrefined.toarray())
    assert_same_graph(refined.r_graph.to_scipy(), expected.toarray()[:n_users, n_users:])
    for (k, v0), (_, v1) in zip(vanilla.state_dict().items(), refined.state_dict().items()):
        torch.testing.assert_close(v0, v1, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("signal, gain", [(1.0, 0.0), (0.0, 0.2)])
def test_learns_planted_structure(signal, gain):
    """Two modalities. Informative features: the graphs built from them already rank perfectly (observed
    1.0 before and after); uninformative features: it learns from the interactions."""
    data, mods = planted_data(users_per=20, items_per=10, modalities=("text", "image"), signal=signal)  # 80 x 40
    torch.manual_seed(0)
    model = gume.GUMEModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16)
    before, after = val_recall_before_after(model, data)
    assert after >= before + gain and after > 0.95, (before, after)


def test_config_defaults_and_the_official_single_cell_search(compose_cfg):
    """conf/model/gume.yaml = GUME.yaml's active (baby) block + overall.yaml; experiment=search_gume is the
    official hyper_parameters ["seed"] with seed [999]: one cell."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mllmrec.config import CONF_DIR
    from mllmrec.pipeline import build_model

    data, mods = planted_data(modalities=("text", "image"))
    model = build_model(compose_cfg("model=gume"), Inputs(data, modalities=mods))
    opt = model.configure_optimizers()
    group = opt["optimizer"].param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.001, 0.0)
    assert opt["lr_scheduler"].lr_lambdas[0](50) == pytest.approx(0.96)
    hp = {k: v for k, v in model.hparams.items() if k not in ("alpha", "k_c", "denoise", "enhance")}
    assert hp == {"d": 64, "n_ui_layers": 3, "n_layers": 2, "knn_k": 10, "bm_loss": 0.01, "bm_temp": 0.4,
                  "um_loss": 0.01, "um_temp": 0.1, "vt_loss": 0.1, "reg_weight_1": 1e-5, "reg_weight_2": 0.1,
                  "batch_size": 2048, "lr_decay": 0.96, "lr_decay_epochs": 50, "refine": False}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=search_gume"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    axes = {k: str(v).split(",") for k, v in params.items() if k not in ("graph.alpha", "graph.k_c")}
    assert axes == {"model": ["gume"], "seed": ["999"]}
