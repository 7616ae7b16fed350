"""VBPR and FREEDOM against dense re-derivations of their equations, feature files as data,
the refinement switch, and learning on planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mm_planted import hand_case, planted_data, val_recall_before_after
from model_inputs import inputs_of

from mllmrec.models.base import Inputs, adam

N_USERS, N_ITEMS = 5, 7


@pytest.fixture
def hand():
    """A hand-made case: 5 users x 7 items, 6-d text features without tied similarities."""
    return hand_case(3)


def dense_norm_bipartite(train: np.ndarray) -> np.ndarray:
    a = np.block([[np.zeros((N_USERS, N_USERS)), train], [train.T, np.zeros((N_ITEMS, N_ITEMS))]])
    d = a.sum(1) + 1e-7
    return a / np.sqrt(np.outer(d, d))


def dense_knn_graph(feats: np.ndarray, k: int) -> np.ndarray:
    """FREEDOM's frozen graph, densely: binary top-k of cosine (self included), D^-1/2 A D^-1/2."""
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = x @ x.T
    a = np.zeros_like(sim)
    for r in range(len(sim)):
        a[r, np.argsort(-sim[r])[:k]] = 1
    d = a.sum(1)
    return a / np.sqrt(np.outer(d, d))


def np_bpr(pos, neg):
    return float(np.mean(np.log1p(np.exp(-(pos - neg)))))


# ---- features as data ---------------------------------------------------------------------------
def test_feature_file_rows_must_match_items(tmp_path):
    from mllmrec.errors import DataError
    from mllmrec.models.modalities import load_feature_file

    np.save(tmp_path / "text_feat.npy", np.ones((3, 4), np.float32))
    with pytest.raises(DataError, match=r"text_feat.npy: has 3 rows but the dataset has 5 items"):
        load_feature_file(tmp_path / "text_feat.npy", 5)
    bad = np.ones((5, 4), np.float32)
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"nan.npy: non-finite value in row 2"):
        load_feature_file(tmp_path / "nan.npy", 5)


def test_one_log_line_names_the_modalities_their_sources_and_shapes(tmp_path, caplog):
    import logging

    from mllmrec.models.modalities import load_modalities

    np.save(tmp_path / "image_feat.npy", np.ones((5, 3), np.float32))
    with caplog.at_level(logging.INFO, logger="mllmrec.models.modalities"):
        mods = load_modalities({"image": tmp_path / "image_feat.npy"}, 5, text_fallback=np.zeros((5, 4)))
    assert list(mods) == ["text", "image"]
    assert [r.getMessage() for r in caplog.records] == [
        f"item modalities (2): text from the encode stage item embeddings (5 x 4), image from "
        f"{tmp_path / 'image_feat.npy'} (5 x 3)"]


def test_missing_modality_is_one_line():
    from mllmrec.errors import ConfigError
    from mllmrec.models.modalities import require_modalities

    with pytest.raises(ConfigError, match="VBPR needs at least one item modality"):
        require_modalities({}, "VBPR")
    with pytest.raises(ConfigError, match="needs the 'image' modality; the dataset has text"):
        require_modalities({"text": np.ones((2, 2))}, "X", "image")


# ---- VBPR --------------------------------------------------------------------------------------
def test_vbpr_forward_and_loss_match_the_equations(hand):
    from mllmrec.models.vbpr import VBPRModule

    _, feats, (users, pos, neg) = hand
    image = np.random.default_rng(4).standard_normal((N_ITEMS, 3)).astype(np.float32)
    model = VBPRModule(inputs_of(shape=(N_USERS, N_ITEMS), modalities={"text": feats, "image": image}), d=4, reg_weight=0.1)
    with torch.no_grad():
        model.item_linear.bias.normal_()
    p = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    f = np.concatenate([feats, image], 1)  # text then image
    items = np.concatenate([p["item_emb"], f @ p["item_linear.weight"].T + p["item_linear.bias"]], 1)
    h_u, h_i = model.representations()
    np.testing.assert_allclose(h_i.detach().numpy(), items, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_u.detach().numpy(), p["user_emb"], rtol=1e-6)
    u, i, j = p["user_emb"][users], items[pos], items[neg]
    reg = (np.linalg.norm(u) + np.linalg.norm(i) + np.linalg.norm(j)) / len(users)
    expected = np_bpr((u * i).sum(1), (u * j).sum(1)) + 0.1 * reg
    assert model.batch_loss(users, pos, neg).item() == pytest.approx(expected, rel=1e-5)


# ---- FREEDOM -----------------------------------------------------------------------------------
def freedom(hand, **kw):
    from mllmrec.models.freedom import FREEDOMModule

    train, feats, _ = hand
    torch.manual_seed(0)
    return FREEDOMModule(inputs_of(train, modalities={"text": feats}), d=4, feat_embed_dim=4, knn_k=3, **kw)


def test_freedom_frozen_graph_matches_a_dense_reference(hand):
    model = freedom(hand)
    np.testing.assert_allclose(model.mm_adj.to_scipy().toarray(), dense_knn_graph(hand[1], 3), rtol=1e-5, atol=1e-7)


def test_freedom_forward_and_loss_match_the_equations(hand):
    train, feats, (users, pos, neg) = hand
    model = freedom(hand, dropout=0.0, reg_weight=0.5)
    model.on_train_epoch_start()  # dropout 0: the full graph
    p = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    a = dense_norm_bipartite(train.toarray())
    ego = np.concatenate([p["user_emb"], p["item_emb"]])
    mean = (ego + a @ ego + a @ (a @ ego)) / 3
    h = dense_knn_graph(feats, 3) @ p["item_emb"]
    h_u, h_i = mean[:N_USERS], mean[N_USERS:] + h
    got_u, got_i = model.representations()
    np.testing.assert_allclose(got_u.detach().numpy(), h_u, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_i.detach().numpy(), h_i, rtol=1e-4, atol=1e-6)
    t = feats @ p["trs.text.weight"].T + p["trs.text.bias"]
    u = h_u[users]
    expected = np_bpr((u * h_i[pos]).sum(1), (u * h_i[neg]).sum(1)) + 0.5 * np_bpr((u * t[pos]).sum(1), (u * t[neg]).sum(1))
    assert model.batch_loss(users, pos, neg).item() == pytest.approx(expected, rel=1e-5)


def test_freedom_pruning_keeps_a_subset_of_the_training_edges(hand):
    train = hand[0]
    model = freedom(hand, dropout=0.5)
    torch.manual_seed(5)
    kept = model.prune_edges()
    assert kept.nnz == int(train.nnz * 0.5)
    assert (kept.multiply(train) != kept).nnz == 0  # only training edges
    torch.manual_seed(5)  # the same draw
    model.on_train_epoch_start()
    np.testing.assert_allclose(model.masked_adj.csr.toarray(), dense_norm_bipartite(kept.toarray()), rtol=1e-5, atol=1e-7)


def test_freedom_pruning_prefers_low_degree_edges():
    """Edges are drawn with probability ~ 1/sqrt(d_u d_i): a star user's edges are dropped more."""
    from mllmrec.models.freedom import FREEDOMModule

    n_u, n_i = 20, 40
    train = np.zeros((n_u, n_i), np.float32)
    train[0, :] = 1  # user 0: degree 40
    for u in range(1, n_u):
        train[u, [2 * u, 2 * u + 1]] = 1  # degree 2
    torch.manual_seed(0)
    model = FREEDOMModule(inputs_of(train, modalities={"text": np.eye(n_i, 8, dtype=np.float32) + 0.1}),
                          d=4, feat_embed_dim=4, knn_k=3, dropout=0.5)
    share_star = np.mean([model.prune_edges()[0].nnz / 40 for _ in range(20)])
    assert share_star < 0.5 - 0.1


# ---- refinement switch -------------------------------------------------------------------------
def test_refine_replaces_exactly_the_item_graph(hand):
    from mllmrec.item_graph import cooccurrence_topk, knn_candidates, refine_item_graph, sym_normalize

    train, feats, _ = hand
    cfg = {"refine": True, "alpha": 0.2, "k_c": 2, "denoise": True, "enhance": True}
    vanilla, refined = freedom(hand), freedom(hand, **cfg)
    idx, sim = knn_candidates(feats, 3, progress=False)
    expected = sym_normalize(refine_item_graph(idx, sim, cooccurrence_topk(train, 2, progress=False), 0.2))
    np.testing.assert_allclose(refined.mm_adj.to_scipy().toarray(), expected.toarray(), rtol=1e-6)
    # independently: the kNN edges with s >= alpha plus the co-occurrence edges, nothing else
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    s = x @ x.T
    knn_edges = {(a, b) for a in range(N_ITEMS) for b in np.argsort(-s[a])[:3] if s[a, b] >= 0.2}
    t = train.toarray()
    inter = t.T @ t
    union = t.sum(0)[:, None] + t.sum(0)[None, :] - inter
    jac = np.where(np.eye(N_ITEMS, dtype=bool), 0, inter / union)
    cooc_edges = {(a, b) for a in range(N_ITEMS) for b in np.lexsort((np.arange(N_ITEMS), -jac[a]))[:2] if jac[a, b] > 0}
    got = refined.mm_adj.to_scipy()
    assert {tuple(e) for e in np.argwhere(got.toarray() > 0)} == knn_edges | cooc_edges
    assert not np.allclose(got.toarray(), vanilla.mm_adj.to_scipy().toarray())
    # everything else is the same model
    for (k, v0), (_, v1) in zip(vanilla.state_dict().items(), refined.state_dict().items()):
        torch.testing.assert_close(v0, v1, msg=k)
    np.testing.assert_array_equal(vanilla.norm_adj.csr.toarray(), refined.norm_adj.csr.toarray())


# ---- learning on planted structure -------------------------------------------------------------
@pytest.mark.parametrize("name", ["vbpr", "freedom"])
def test_learns_planted_structure(name):
    from mllmrec.models.freedom import FREEDOMModule
    from mllmrec.models.vbpr import VBPRModule

    data, mods = planted_data()
    torch.manual_seed(0)
    if name == "vbpr":
        model = VBPRModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16)
    else:
        model = FREEDOMModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16, feat_embed_dim=16, knn_k=5)
    before, after = val_recall_before_after(model, data)
    assert after > before + 0.2, (before, after)
