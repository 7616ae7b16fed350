"""SMORE against a dense float64 re-derivation of the official code's equations (kennethorq/SMORE
``src/models/smore.py``: ``build_sim`` -> top-k -> ``get_sparse_laplacian('sym')``, ``max_pool_fusion``,
``spectrum_convolution``, ``forward``, ``bpr_loss``, ``InfoNCE``, ``calculate_loss``), written without
torch.fft or torch.sparse; the one-modality form, dropout, the refinement switch, and learning on planted
structure."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from gradients import assert_gradients_match, distinct_settings
from mm_planted import planted_data, val_recall_before_after
from model_inputs import inputs_of

from mllmrec.models.base import Inputs, adam

U, I, D = 3, 5, 4
# distinct k's per modality: a swap of image_knn_k and text_knn_k changes both graphs
KNN = distinct_settings(ks={"image_knn_k": 2, "text_knn_k": 3})
K_OF = {"image": KNN["image_knn_k"], "text": KNN["text_knn_k"]}
WEIGHTS = distinct_settings(weights={"reg_weight": 50.0, "cl_weight": 0.5})
TRAIN = np.zeros((U, I))
for _u, _items in enumerate([[0, 1, 2], [1, 3], [0, 2, 3]]):  # item 4 has no training interaction
    TRAIN[_u, _items] = 1
TEXT = np.array([[1.0, 0.1, 0.3], [0.2, 1.0, 0.4], [0.5, 0.4, 1.0], [0.9, 0.8, 0.1], [0.2, 0.9, 0.3]], np.float32)
# item 4 points away from the others: its 2nd image neighbour (item 2) has a negative cosine, an edge the
# text graph does not have, so the max-pool must keep the negative value (absent = missing, not 0)
IMAGE = np.array([[1.0, 0.2], [0.9, 0.5], [0.3, 1.0], [0.6, 0.8], [-1.0, -0.3]], np.float32)
# a batch with a repeated user (0) and a repeated positive item (2): both are their own in-batch negatives
BATCH = (torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 3, 0, 2, 1]), torch.tensor([4, 0, 1, 3, 2]))


def smore(modalities=("text", "image"), train=TRAIN, **kw):
    from mllmrec.models.smore import SMOREModule

    feats = {"text": TEXT, "image": IMAGE}
    torch.manual_seed(0)
    model = SMOREModule(inputs_of(sp.csr_matrix(train), modalities={m: feats[m] for m in modalities}), d=D,
                        ui_layers=2, **KNN, **kw)
    with torch.no_grad():  # non-zero biases, so that a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


OFFICIAL_NAMES = {
    "user_embedding.weight": "user_emb", "item_id_embedding.weight": "item_emb", "image_embedding.weight": "feat.image",
    "text_embedding.weight": "feat.text", "image_trs": "trs.image", "text_trs": "trs.text", "query_v": "query.image",
    "query_t": "query.text", "gate_v": "gate.image", "gate_t": "gate.text", "gate_f": "gate.fusion",
    "gate_image_prefer": "prefer.image", "gate_text_prefer": "prefer.text", "gate_fusion_prefer": "prefer.fusion",
    "image_complex_weight": "spectral.image", "text_complex_weight": "spectral.text",
    "fusion_complex_weight": "spectral.fusion"}


def official_names(model) -> dict[str, str]:
    """Official attribute name -> the module's parameter name."""
    out = {}
    for official, ours in OFFICIAL_NAMES.items():
        for key in model.state_dict():
            if key == ours or key.startswith(ours + "."):
                out[official + key[len(ours):]] = key
    return out


def official_params(model) -> dict[str, np.ndarray]:
    """The module's parameters under the official attribute names, float64."""
    state = model.state_dict()
    return {official: state[ours].detach().double().numpy() for official, ours in official_names(model).items()}


# ---- dense re-derivation of the official code --------------------------------------------------
def knn_laplacian(f: np.ndarray, k: int) -> np.ndarray:
    """build_sim -> torch.topk(k) -> get_sparse_laplacian(norm='sym'): cosine weights, directed, D = row sums."""
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = x @ x.T
    s = np.zeros_like(sim)
    for r in range(len(sim)):
        top = np.argsort(-sim[r])[:k]
        assert sim[r, top[-1]] > np.sort(sim[r])[::-1][k], "tie at the k-th neighbour: pick other features"
        s[r, top] = sim[r, top]
    d = s.sum(1) ** -0.5
    return d[:, None] * s * d[None, :]


def max_pool(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """max_pool_fusion: -inf where a graph lacks the edge, max over the union."""
    ma, mb = a != 0, b != 0
    both = np.maximum(np.where(ma, a, -np.inf), np.where(mb, b, -np.inf))
    return np.where(ma | mb, both, 0.0)


def norm_bipartite(train: np.ndarray) -> np.ndarray:
    """get_adj_mat: D^-1/2 A D^-1/2, inf -> 0."""
    a = np.block([[np.zeros((U, U)), train], [train.T, np.zeros((I, I))]])
    deg = a.sum(1)
    d = np.where(deg > 0, deg, np.inf) ** -0.5
    return d[:, None] * a * d[None, :]


def circular_filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """irfft(rfft(x, 'ortho') * w, 'ortho') written out: x circularly convolved with the real kernel whose
    half-spectrum is w (d even; the imaginary parts of the DC and Nyquist bins drop out)."""
    d = x.shape[1]
    wr, wi = w[0, :, 0], w[0, :, 1]
    n = np.arange(d)
    kern = wr[0] + wr[d // 2] * (-1.0) ** n
    for j in range(1, d // 2):
        kern = kern + 2 * (wr[j] * np.cos(2 * np.pi * j * n / d) - wi[j] * np.sin(2 * np.pi * j * n / d))
    kern = kern / d
    return np.stack([[sum(row[m] * kern[(i - m) % d] for m in range(d)) for i in range(d)] for row in x])


def circular_conv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a.shape[1]
    return np.stack([[sum(ra[m] * rb[(i - m) % d] for m in range(d)) for i in range(d)] for ra, rb in zip(a, b)])


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lin(p, name, x):
    return x @ p[name + ".weight"].T + (p[name + ".bias"] if name + ".bias" in p else 0.0)


def dense_forward(p: dict, modalities=("image", "text")):
    """forward(norm_adj, train=True) with dropout 0: (final, side, content), [(U + I), d]."""
    graphs = {m: knn_laplacian({"text": TEXT, "image": IMAGE}[m].astype(np.float64), K_OF[m]) for m in modalities}
    graphs["fusion"] = graphs[modalities[0]] if len(modalities) == 1 else max_pool(graphs["image"], graphs["text"])
    adj = norm_bipartite(TRAIN)
    r_hat = adj[:U, U:]
    x = {m: lin(p, f"{m}_trs", p[f"{m}_embedding.weight"]) for m in modalities}
    conv = {m: circular_filter(x[m], p[f"{m}_complex_weight"]) for m in modalities}
    if len(modalities) == 2:  # irfft(X_t X_v W_f, 'ortho'): one extra 1/sqrt(d) from the second spectrum
        conv["fusion"] = circular_filter(circular_conv(x["text"], x["image"]), p["fusion_complex_weight"]) / np.sqrt(D)
    else:
        conv["fusion"] = circular_filter(x[modalities[0]], p["fusion_complex_weight"])
    item = p["item_id_embedding.weight"]
    gate = {"image": "gate_v", "text": "gate_t", "fusion": "gate_f"}
    views = {}
    for v, c in conv.items():
        h = graphs[v] @ (item * sigmoid(lin(p, f"{gate[v]}.0", c)))
        views[v] = np.concatenate([r_hat @ h, h])
    ego = np.concatenate([p["user_embedding.weight"], item])
    content = (ego + adj @ ego + adj @ adj @ ego) / 3
    query = {"image": "query_v", "text": "query_t"}
    parts = []
    for m in modalities:
        logits = lin(p, f"{query[m]}.2", np.tanh(lin(p, f"{query[m]}.0", views["fusion"])))
        att = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # softmax over the d features
        parts.append(sigmoid(lin(p, f"gate_{m}_prefer.0", content)) * att * views[m])
    parts.append(sigmoid(lin(p, "gate_fusion_prefer.0", content)) * views["fusion"])
    side = sum(parts) / len(parts)
    return content + side, side, content


def info_nce(a, b, tau=0.2):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(-np.log(np.exp((a * b).sum(1) / tau) / np.exp(a @ b.T / tau).sum(1))))


def dense_loss(final, side, content, reg_weight, cl_weight, batch_size=2048):
    users, pos, neg = (t.numpy() for t in BATCH)
    u, i, j = final[users], final[U + pos], final[U + neg]
    mf = float(np.mean(np.log1p(np.exp(-((u * i).sum(1) - (u * j).sum(1))))))
    reg = reg_weight * 0.5 * ((u ** 2).sum() + (i ** 2).sum() + (j ** 2).sum()) / batch_size
    cl = info_nce(side[U + pos], content[U + pos]) + info_nce(side[users], content[users])
    return mf + reg + cl_weight * cl


# ---- tests -------------------------------------------------------------------------------------
def test_forward_matches_the_official_equations():
    model = smore()
    final, _, _ = dense_forward(official_params(model))
    model.eval()
    got_u, got_i = model.representations()
    np.testing.assert_allclose(got_u.detach().numpy(), final[:U], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_i.detach().numpy(), final[U:], rtol=1e-5, atol=1e-6)


def test_loss_matches_the_official_equations():
    model = smore(reg_weight=50.0, cl_weight=0.5)
    expected = dense_loss(*dense_forward(official_params(model)), reg_weight=50.0, cl_weight=0.5)
    assert model.batch_loss(*BATCH).item() == pytest.approx(expected, rel=1e-5)


def test_loss_gradients_match_the_official_equations():
    """Sampled entries of every parameter's gradient (dropout 0) against central differences of the official
    loss (float64): a stop-gradient in one branch leaves the values above unchanged and fails here."""
    model = smore(**WEIGHTS)
    model.batch_loss(*BATCH).backward()
    p = official_params(model)
    ours = dict(model.named_parameters())
    grads = {key: ours[name].grad.double() for key, name in official_names(model).items()}
    params = {k: torch.from_numpy(v) for k, v in p.items()}  # views: perturbing them perturbs p
    checked = assert_gradients_match(model, grads, lambda: dense_loss(*dense_forward(p), **WEIGHTS), rtol=1e-3,
                                     atol=1e-6, params=params, what="the official loss's central difference")
    assert len(grads) == len(ours) and checked == sum(min(5, v.numel()) for v in ours.values())


def test_item_graphs_and_max_pool_fusion_over_the_union_of_edges():
    from mllmrec.models.smore import max_pool_fusion

    model = smore()
    image, text = knn_laplacian(IMAGE.astype(np.float64), K_OF["image"]), knn_laplacian(TEXT.astype(np.float64), K_OF["text"])
    fusion = max_pool(image, text)
    assert fusion[4, 2] < 0 and text[4, 2] == 0  # the case exercises "absent = missing"
    for name, expected in (("image", image), ("text", text), ("fusion", fusion)):
        np.testing.assert_allclose(model.item_graph[name].to_scipy().toarray(), expected, rtol=1e-6, atol=1e-7)
    a = sp.csr_matrix(np.array([[0.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, -1.0]]))
    b = sp.csr_matrix(np.array([[0.0, -3.0, 0.75], [0.25, 0.0, 0.0], [0.0, 0.0, -4.0]]))
    got = max_pool_fusion([a, b])
    np.testing.assert_array_equal(got.toarray(), max_pool(a.toarray(), b.toarray()))
    assert got.nnz == 5  # the union of stored edges, negative values kept


def test_one_modality_form(caplog):
    with caplog.at_level(logging.INFO, logger="mllmrec.models.smore"):
        model = smore(modalities=("text",), reg_weight=50.0, cl_weight=0.5)
    lines = [r.getMessage() for r in caplog.records if "SMORE: one modality (text)" in r.getMessage()]
    assert len(lines) == 1 and "no image view" in lines[0]
    assert set(model.item_graph) == {"text", "fusion"} and set(model.query) == {"text"}
    np.testing.assert_array_equal(model.item_graph["fusion"].to_scipy().toarray(),
                                  model.item_graph["text"].to_scipy().toarray())
    final, side, content = dense_forward(official_params(model), modalities=("text",))
    model.eval()
    np.testing.assert_allclose(torch.cat(model.representations()).detach().numpy(), final, rtol=1e-5, atol=1e-6)
    model.train()
    expected = dense_loss(final, side, content, reg_weight=50.0, cl_weight=0.5)
    assert model.batch_loss(*BATCH).item() == pytest.approx(expected, rel=1e-5)


def test_dropout_only_in_training():
    reference = torch.cat(smore().eval().representations()).detach()
    model = smore(dropout=0.1)
    first, second = model.embed()[0].detach(), model.embed()[0].detach()
    assert not torch.equal(first, second)
    model.eval()
    torch.testing.assert_close(torch.cat(model.representations()).detach(), reference, rtol=0, atol=0)


def test_lr_decay_and_bad_dropout():
    from mllmrec.errors import ConfigError

    sched = smore().configure_optimizers()["lr_scheduler"]
    assert [round(f(e), 10) for f in sched.lr_lambdas for e in (0, 50, 100)] == [1.0, 0.96, round(0.96 ** 2, 10)]
    with pytest.raises(ConfigError, match="model.dropout"):
        smore(dropout=1.0)


def _dense_refined_edges(f: np.ndarray, k: int, alpha: float, k_c: int) -> set:
    """The kNN edges (self included) with cosine >= alpha, plus each item's top-K_c Jaccard co-audience items."""
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = x @ x.T
    edges = {(r, int(c)) for r in range(I) for c in np.argsort(-sim[r])[:k] if sim[r, c] >= alpha}
    inter = TRAIN.T @ TRAIN
    deg = TRAIN.sum(0)
    for a in range(I):
        jac = [(inter[a, b] / (deg[a] + deg[b] - inter[a, b]), b) for b in range(I) if b != a and inter[a, b] > 0]
        edges |= {(a, b) for _, b in sorted(jac, key=lambda t: (-t[0], t[1]))[:k_c]}
    return edges


def test_refine_changes_exactly_the_item_graphs():
    cfg = {"refine": True, "alpha": 0.7, "k_c": 1, "denoise": True, "enhance": True}
    vanilla, refined = smore(), smore(**cfg)
    for m, f in (("image", IMAGE), ("text", TEXT)):
        graph = refined.item_graph[m].to_scipy()
        assert {(int(r), int(c)) for r, c in zip(*graph.nonzero())} == _dense_refined_edges(f, K_OF[m], 0.7, 1), m
        assert vanilla.item_graph[m].to_scipy().nnz == I * K_OF[m]
    fusion = max_pool(refined.item_graph["image"].to_scipy().toarray(), refined.item_graph["text"].to_scipy().toarray())
    np.testing.assert_array_equal(refined.item_graph["fusion"].to_scipy().toarray(), fusion)
    assert not np.array_equal(vanilla.item_graph["fusion"].to_scipy().toarray(), fusion)
    assert vanilla.state_dict().keys() == refined.state_dict().keys()
    for (k, v0), (_, v1) in zip(vanilla.state_dict().items(), refined.state_dict().items()):
        torch.testing.assert_close(v0, v1, rtol=0, atol=0, msg=k)
    assert (vanilla.norm_adj.csr != refined.norm_adj.csr).nnz == 0
    for buf in ("rows", "cols", "vals"):
        assert torch.equal(getattr(vanilla.r_hat, buf), getattr(refined.r_hat, buf))


def test_learns_planted_structure_with_two_modalities():
    from mllmrec.models.smore import SMOREModule

    data, mods = planted_data(modalities=("text", "image"))
    torch.manual_seed(0)
    model = SMOREModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16, image_knn_k=5, text_knn_k=5)
    before, after = val_recall_before_after(model, data)
    assert after > before + 0.2, (before, after)


def test_info_nce_over_distinct_rows_equals_the_in_batch_form():
    from mllmrec.models.losses import in_batch_info_nce, info_nce_over_rows

    g = torch.Generator().manual_seed(0)
    a_table = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b_table = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([3, 1, 3, 0, 5, 3, 1])
    full = in_batch_info_nce(a_table[index], b_table[index], 0.2)
    grads_full = torch.autograd.grad(full, (a_table, b_table))
    fast = info_nce_over_rows(a_table, b_table, index, 0.2)
    grads_fast = torch.autograd.grad(fast, (a_table, b_table))
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads_fast, grads_full):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
