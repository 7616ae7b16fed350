"""SOIL against a dense re-derivation of the official code (tests/soil_reference.py: the official
user loops, dense I x I similarities, float64), its single-modality form, the official quirks (the
1e-7 floor, user degrees read at item ids, ties at the k-th second-order slot), the refinement
switch, learning on planted structure and leakage in its official form."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import soil_reference as ref
import torch
from gradients import assert_gradients_match, distinct_settings, every_entry
from mm_planted import planted_data, val_recall_before_after
from model_inputs import inputs_of

from mllmrec.errors import ConfigError
from mllmrec.models import soil
from mllmrec.models.base import Inputs, adam

HISTORIES = [[0, 1], [1, 2], [3], [0, 3], [2], [1]]  # 6 users, 5 items; item 4 in no history
# distinct k's (a swap of two of them changes the graphs); the hand case has no top-k tie and no negative
# degree (NaN in the official code) with these; knn_a = 3 (= knn_i) adds negative and summed second-order
# entries: the graph test runs both
KNN = distinct_settings(ks={"knn_i": 3, "knn_k": 2, "knn_a": 0})
WEIGHTS = distinct_settings(weights={"cl_loss": 0.3, "cl_loss2": 0.7})


def hand_case():
    """Two modalities at chosen angles: negative text cosines (the 1e-7 floor in the kNN part and in
    the second-order block), pairs inside a history summed on one item; no tie in any top-k (interest
    columns, kNN rows, second-order block at knn_a = 3)."""
    angles, norms = np.deg2rad([0, 20, 45, 200, 260]), np.array([1, 2, 0.5, 1.5, 3])
    text = np.stack([np.cos(angles), np.sin(angles)], 1) * norms[:, None]
    image = np.array([[1, 0, 0], [1, 1, 0], [0.8, 1, 0.2], [0.1, 0.3, 1], [0.5, 0.2, 0.9]])
    train = np.zeros((6, 5))
    for u, items in enumerate(HISTORIES):
        train[u, items] = 1
    return train, {"image": image, "text": text}


def build(train, feats, **kw):
    torch.manual_seed(0)
    mods = {m: np.asarray(f, np.float32) for m, f in feats.items()}
    return soil.SOILModule(inputs_of(sp.csr_matrix(train), modalities=mods), d=4, **{**KNN, **kw})


def official_params(model) -> dict:
    """The model's parameters under the official code's names, float64."""
    names = {"user_emb": "user_embedding.weight", "item_emb": "item_id_embedding.weight"}
    out = {}
    for name, value in model.named_parameters():
        key = names.get(name, name)
        for a, b in (("trs.image", "image_trs"), ("trs.text", "text_trs"), ("map.image", "map_v"), ("map.text", "map_t")):
            key = key.replace(a, b)
        out[key] = value.detach().double().numpy()
    return out


def reference(train, feats, knn_a, modalities=("image", "text")):
    sims = [ref.build_sim(feats[m]) for m in modalities]
    g = dict(zip(modalities, ref.interest_adj(train, sims, KNN["knn_i"], KNN["knn_k"])))
    a, tied = ref.second_order(train, sims, knn_a)
    a_ui, r_aug = ref.augmented_graphs(train, a)
    return g, a, tied, a_ui, r_aug


def assert_same_graph(got: sp.spmatrix, expected: np.ndarray):
    got = got.toarray()
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("knn_a", [KNN["knn_a"], 3])
def test_graphs_match_the_official_loops(knn_a):
    train, feats = hand_case()
    g, a, tied, a_ui, r_aug = reference(train, feats, knn_a=knn_a)
    assert tied == [] and (knn_a != 3 or ((a < 0).any() and (a > 1.5).any()))  # tie-free; negatives and sums
    assert ref.interest_ties(train, [ref.build_sim(feats[m]) for m in ("image", "text")], KNN["knn_i"], KNN["knn_k"]) == 0
    assert ((g["text"] > 0) & (g["text"] <= 1e-7)).any()  # a negative cosine floored to 1e-7
    model = build(train, feats, knn_a=knn_a)
    for m in ("image", "text"):
        assert_same_graph(model.item_graph[m].to_scipy(), g[m])
    assert_same_graph(model.ui_graph.csr, a_ui)
    assert_same_graph(model.r_graph.to_scipy(), r_aug)


def test_forward_and_loss_match_the_official_equations():
    train, feats = hand_case()
    g, _, _, a_ui, r_aug = reference(train, feats, knn_a=KNN["knn_a"])
    model = build(train, feats, **WEIGHTS)
    p = official_params(model)
    final, side, content = ref.forward(p, feats, (a_ui, r_aug, g))
    got_u, got_i = model.representations()
    np.testing.assert_allclose(got_u.detach().numpy(), final[:6], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_i.detach().numpy(), final[6:], rtol=1e-4, atol=1e-6)
    users, pos, neg = np.array([0, 1, 3, 3, 5]), np.array([1, 2, 0, 3, 1]), np.array([4, 3, 2, 4, 0])
    expected = ref.loss(final, side, content, 6, users, pos, neg, WEIGHTS["cl_loss"], WEIGHTS["cl_loss2"])
    got = model.batch_loss(*(torch.from_numpy(x) for x in (users, pos, neg)))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_match_the_official_equations():
    """Every parameter entry's gradient against central differences of the official loss (float64): a
    stop-gradient in one branch leaves the values above unchanged and fails here."""
    train, feats = hand_case()
    g, _, _, a_ui, r_aug = reference(train, feats, knn_a=KNN["knn_a"])
    model = build(train, feats, **WEIGHTS)
    p = official_params(model)
    users, pos, neg = np.array([0, 1, 3, 3, 5]), np.array([1, 2, 0, 3, 1]), np.array([4, 3, 2, 4, 0])
    model.batch_loss(*(torch.from_numpy(x) for x in (users, pos, neg))).backward()
    grads = {key: param.grad.double() for key, (_, param) in zip(p, model.named_parameters())}

    def official_loss():
        return ref.loss(*ref.forward(p, feats, (a_ui, r_aug, g)), 6, users, pos, neg, *WEIGHTS.values())

    params = {k: torch.from_numpy(v) for k, v in p.items()}  # views: perturbing them perturbs p
    checked = assert_gradients_match(model, grads, official_loss, rtol=1e-3, atol=1e-6, params=params,
                                     entries=every_entry, what="the official loss's central difference")
    assert checked == sum(param.numel() for param in model.parameters())


def test_second_order_tie_rule_keeps_row_sums_and_untied_rows():
    train, feats = hand_case()
    _, a_ref, tied, _, _ = reference(train, feats, knn_a=2)
    assert tied == [0]  # H_0 = {0, 1}: Q[0, 1] = Q[1, 0] compete for the last slot
    xns = [soil.unit_rows(feats[m]) for m in ("image", "text")]
    a = soil.second_order_edges(sp.csr_matrix(train, dtype=np.float32), xns, knn_a=2).toarray()
    np.testing.assert_allclose(a.sum(1), a_ref.sum(1), rtol=1e-6)
    np.testing.assert_allclose(a[1:], a_ref[1:], rtol=1e-6, atol=1e-7)
    # the documented rule: of the equal entries Q[0, 1] (row 0) and Q[1, 0] (row 1), the smaller history
    # item's row wins: item 1 gets the value (torch.topk on CPU gives it to item 0 here)
    q01 = (ref.build_sim(feats["image"]) * ref.build_sim(feats["text"]))[0, 1]
    np.testing.assert_allclose(a[0, 2:], a_ref[0, 2:], rtol=1e-6)
    np.testing.assert_allclose(a[0, :2], [1.0, 1.0 + q01], rtol=1e-6)


def test_chunked_builders_match_the_official_loops(monkeypatch):
    """Larger random case, several similarity chunks: interest graphs exact; second order on the users
    without a tie, row sums on all."""
    monkeypatch.setattr(soil, "CHUNK_BYTES", 4 * 30 * 7)  # 7 rows per chunk
    rng = np.random.default_rng(3)
    train = (rng.random((40, 30)) < 0.15).astype(np.float64)
    train[np.arange(40), rng.integers(0, 30, 40)] = 1
    train[5] = 0  # a user without history
    feats = {"image": rng.random((30, 7)), "text": rng.random((30, 5)) + 0.2}
    sims = [ref.build_sim(feats[m]) for m in ("image", "text")]
    assert ref.interest_ties(train, sims, 3, 4) == 0
    g = ref.interest_adj(train, sims, 3, 4)
    xns = {m: soil.unit_rows(feats[m]) for m in ("image", "text")}
    csr = sp.csr_matrix(train, dtype=np.float32)
    got = soil.interest_graphs(csr, xns, 3)
    for m, expected in zip(("image", "text"), g):
        knn = soil.weighted_knn_graph(xns[m], 4, m)
        assert_same_graph(got[m] + knn, expected)
    a_ref, tied = ref.second_order(train, sims, 2)
    a = soil.second_order_edges(csr, list(xns.values()), 2).toarray()
    untied = np.setdiff1d(np.arange(40), tied)
    assert len(untied) >= 30
    np.testing.assert_allclose(a[untied], a_ref[untied], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.sum(1), a_ref.sum(1), rtol=1e-5)


def test_single_modality_form(caplog):
    train, feats = hand_case()
    text = {"text": feats["image"]}  # non-negative: no negative degree (NaN in the official code), no tie
    g, _, tied, a_ui, r_aug = reference(train, text, knn_a=KNN["knn_a"], modalities=("text",))
    assert tied == [] and ref.interest_ties(train, [ref.build_sim(text["text"])], KNN["knn_i"], KNN["knn_k"]) == 0
    with caplog.at_level(logging.INFO, logger="mllmrec.models.soil"):
        model = build(train, text, knn_a=KNN["knn_a"])
    assert [r.message for r in caplog.records if "one modality" in r.message] == [
        "SOIL with one modality (text): interest columns and second-order similarity from it alone, no attention "
        "fuser, side = x_text / 2 (the fuser and the other map are created, unused)"]
    assert_same_graph(model.item_graph["text"].to_scipy(), g["text"])
    assert_same_graph(model.ui_graph.csr, a_ui)
    final, side, _ = ref.forward(official_params(model), text, (a_ui, r_aug, g))
    x_text = ref.branch(official_params(model), text, "text", r_aug, g)
    np.testing.assert_allclose(side, x_text / 2, rtol=1e-6)
    np.testing.assert_allclose(model.representations()[0].detach().numpy(), final[:6], rtol=1e-4, atol=1e-6)


def test_official_r_normalisation_needs_no_more_items_than_users():
    train, feats = hand_case()
    wide = np.concatenate([train, np.zeros((6, 2))], 1)  # 7 items > 6 users
    wide_feats = {m: np.concatenate([f, f[:2] + 0.1], 0) for m, f in feats.items()}
    with pytest.raises(ConfigError, match="model.mm_r_norm.*7 items > 6 users.*mm_r_norm=item_degrees") as err:
        build(wide, wide_feats, knn_a=KNN["knn_a"])
    assert "\n" not in str(err.value)
    model = build(wide, wide_feats, knn_a=KNN["knn_a"], mm_r_norm="item_degrees")  # the corrected form: R = A_ui's block
    ui = model.ui_graph.csr.toarray()
    np.testing.assert_allclose(model.r_graph.to_scipy().toarray(), ui[:6, 6:], rtol=1e-6)


@pytest.mark.parametrize("key, kw, match", [
    ("knn_a", {"knn_a": 4}, r"knn_a \+ \|H_u\| = 6 \(user 0\) must be in \[0, 5\]"),
    ("knn_i", {"knn_a": 3, "knn_i": 6}, r"must be in \[1, 5\]"),
    ("mm_r_norm", {"knn_a": 3, "mm_r_norm": "items"}, "official or item_degrees")])
def test_settings_the_official_code_cannot_run_are_one_line_errors(key, kw, match):
    train, feats = hand_case()
    with pytest.raises(ConfigError, match=f"model.{key}.*{match}"):
        build(train, feats, **kw)


def test_negative_degree_gives_the_factor_of_an_empty_row(caplog):
    """Official: deg^-1/2 of a negative degree is NaN (and so is the model's output); here factor 0."""
    adj = np.array([[1.0, -3.0, 0.5], [-3.0, 1.0, 0.0], [0.5, 0.0, 2.0]])
    expected = ref.laplacian_sym(adj)
    assert np.isnan(expected[:2]).any()
    r, c = np.nonzero(adj)
    with caplog.at_level(logging.WARNING, logger="mllmrec.models.soil"):
        got = soil.sym_graph(r, c, adj[r, c], 3, "test").toarray()
    assert "test: 2 negative degree(s)" in caplog.text
    nan, edge = np.isnan(expected) & (adj != 0), adj != 0
    assert nan.sum() == 6 and np.array_equal(got != 0, edge)
    np.testing.assert_allclose(got[edge & ~nan], expected[edge & ~nan], rtol=1e-6)
    np.testing.assert_array_equal(got[nan], np.float32(1e-7))


def test_negative_interest_degrees_are_the_official_loops_and_logged_for_their_modality(caplog):
    """Issue 31's report: signed features (one modality) give negative interest-graph degrees. Ours are in
    the same rows as the official user loop's (no top-k tie here), per modality, and the warning names the
    modality that has them (image: signed features) and not the other (text: positive features)."""
    rng = np.random.default_rng(3)
    train = (rng.random((30, 25)) < 0.15).astype(float)
    feats = {"image": rng.standard_normal((25, 3)), "text": np.abs(rng.standard_normal((25, 4))) + 0.2}
    sims = [ref.build_sim(feats[m]) for m in ("image", "text")]
    assert ref.interest_ties(train, sims, 4, 3) == 0
    official = {}
    for m, s in zip(("image", "text"), sims):
        interest = np.zeros_like(s)
        for u in range(train.shape[0]):  # the official loop: top-k columns over BOTH modalities' sums
            items = np.flatnonzero(train[u])
            if len(items):
                cols = np.unique(np.concatenate([ref.topk(t[items].sum(0), 4).indices.numpy() for t in sims]))
                interest[np.ix_(items, cols)] += s[np.ix_(items, cols)]
        official[m] = np.flatnonzero(interest.sum(1) < 0)
    assert len(official["image"]) == 4 and len(official["text"]) == 0  # rows 3, 4, 20, 24
    xns = {m: soil.unit_rows(f) for m, f in feats.items()}
    with caplog.at_level(logging.WARNING, logger="mllmrec.models.soil"):
        graphs = soil.interest_graphs(sp.csr_matrix(train), xns, 4)
    assert "interest graph (image): 4 negative degree(s)" in caplog.text and "interest graph (text)" not in caplog.text
    count = (sp.csr_matrix(train).T @ soil.interest_columns(sp.csr_matrix(train), list(xns.values()), 4)).tocoo()
    degree = np.bincount(count.row, weights=count.data * soil.pair_cosines(xns["image"], count.row, count.col),
                         minlength=25)
    np.testing.assert_array_equal(np.flatnonzero(degree < 0), official["image"])
    assert set(graphs) == {"image", "text"}


def test_top_k_ties_go_to_the_smaller_column():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5], [0.2, 0.2, 0.2, 0.2, 0.3]])
    vals, cols = soil.topk_desc(scores, 3)
    assert cols.tolist() == [[1, 0, 2], [4, 0, 1]]
    np.testing.assert_allclose(vals.numpy(), [[0.9, 0.5, 0.5], [0.3, 0.2, 0.2]])


def test_knn_settings_per_dataset(caplog):
    assert soil.official_knn("clothing", None, None) == (5, 3)
    assert soil.official_knn("sports", 7, None) == (7, 6)
    with caplog.at_level(logging.INFO, logger="mllmrec.models.soil"):
        assert soil.official_knn("office", None, None) == (10, 2)
    assert "no official knn_i/knn_a for dataset 'office': baby's (10, 2)" in caplog.text


def test_refine_replaces_the_knn_part_of_the_item_graph_only():
    from mllmrec.item_graph import cooccurrence_topk, knn_candidates, refine_item_graph, sym_normalize

    train, feats = hand_case()
    cfg = {"refine": True, "alpha": 0.5, "k_c": 1, "denoise": True, "enhance": True}
    vanilla, refined = build(train, feats, knn_a=KNN["knn_a"]), build(train, feats, knn_a=KNN["knn_a"], **cfg)
    csr = sp.csr_matrix(train, dtype=np.float32)
    for m in ("image", "text"):
        sims = ref.build_sim(feats[m])
        val, ind = ref.topk(sims, KNN["knn_k"])
        knn = np.zeros_like(sims)
        np.put_along_axis(knn, ind.numpy(), val.numpy(), axis=1)
        interest = vanilla.item_graph[m].to_scipy().toarray() - ref.laplacian_sym(knn)
        idx, sim = knn_candidates(feats[m].astype(np.float32), KNN["knn_k"], progress=False)
        graph = refine_item_graph(idx, sim, cooccurrence_topk(csr, 1, progress=False), 0.5)
        edges = {(i, j) for i, j, s in zip(np.repeat(np.arange(5), KNN["knn_k"]), idx.ravel(), sim.ravel()) if s >= 0.5}
        edges |= set(zip(*cooccurrence_topk(csr, 1, progress=False).nonzero()))
        assert set(zip(*graph.nonzero())) == edges
        np.testing.assert_allclose(refined.item_graph[m].to_scipy().toarray(),
                                   interest + sym_normalize(graph).toarray(), rtol=1e-5, atol=1e-7)
        assert not np.allclose(refined.item_graph[m].to_scipy().toarray(), vanilla.item_graph[m].to_scipy().toarray())
    for (k, v0), (_, v1) in zip(vanilla.state_dict().items(), refined.state_dict().items()):
        torch.testing.assert_close(v0, v1, rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(vanilla.ui_graph.csr.toarray(), refined.ui_graph.csr.toarray())
    np.testing.assert_array_equal(vanilla.r_graph.to_scipy().toarray(), refined.r_graph.to_scipy().toarray())


@pytest.mark.parametrize("shape", [(5, 4), (5, 5)])
def test_csr_graph_gradcheck(shape):
    from mllmrec.models.layers import CSRGraph

    rng = np.random.default_rng(0)
    matrix = sp.random(*shape, density=0.5, random_state=1, dtype=np.float64)
    assert shape[0] != shape[1] or abs(matrix - matrix.T).max() > 0.1  # not symmetric
    graph = CSRGraph(matrix)
    x = torch.from_numpy(rng.standard_normal((shape[1], 3))).requires_grad_()
    np.testing.assert_allclose(graph(x).detach().numpy(), matrix.toarray().astype(np.float32) @ x.detach().numpy(),
                               rtol=1e-6)
    assert torch.autograd.gradcheck(graph, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("signal, gain", [(1.0, 0.05), (0.0, 0.2)])
def test_learns_planted_structure(signal, gain):
    """Informative features: the graphs built from them already rank well (observed .91), training closes
    the gap; uninformative features: it learns from the interactions (observed .68 -> 1.0)."""
    data, mods = planted_data(users_per=20, items_per=10, modalities=("text", "image"), signal=signal)  # 80 x 40
    torch.manual_seed(0)
    model = soil.SOILModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16, knn_i=5, knn_a=KNN["knn_a"])
    before, after = val_recall_before_after(model, data)
    assert after > before + gain and after > 0.95, (before, after)


def test_official_form_does_not_see_heldout_interactions(compose_cfg):
    from test_mm_leakage import built_and_trained, heldout_moved

    data, mods = planted_data(users_per=20, items_per=10, modalities=("text", "image"))
    built_a, trained_a = built_and_trained(compose_cfg, ["model=soil", "model.d=16"], data, mods)
    built_b, trained_b = built_and_trained(compose_cfg, ["model=soil", "model.d=16"], heldout_moved(data), mods)
    for name in built_a:
        torch.testing.assert_close(built_a[name], built_b[name], rtol=0, atol=0, msg=name)
    for name in trained_a:
        torch.testing.assert_close(trained_a[name], trained_b[name], rtol=0, atol=0, msg=name)
