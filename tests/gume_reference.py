"""A dense re-derivation of GUME as the official code computes it (NanGongNingYi/GUME @ 44a4dce,
``src/models/gume.py`` and ``src/utils/utils.py``), float64, dense matrices, ``find_inter`` as a loop over
the rows' top-k lists; for tests/test_mm_gume.py. Written from the official code, not from
mllmrec.models.gume."""

from __future__ import annotations

import numpy as np
import torch
from soil_reference import build_sim, info_nce, linear  # noqa: F401 - the same official helpers (MGCN family)


def knn_normalized_graph(sim, k):
    """build_knn_normalized_graph(sim, k, 'sym') dense: (graph, top-k column lists per row)."""
    val, ind = torch.topk(torch.from_numpy(np.ascontiguousarray(sim)), k, dim=-1)
    adj = np.zeros_like(sim)
    np.put_along_axis(adj, ind.numpy(), val.numpy(), axis=1)
    with np.errstate(divide="ignore"):
        d = adj.sum(1) ** -0.5
    d[np.isinf(d)] = 0.0
    return d[:, None] * adj * d[None, :], ind.numpy()


def find_inter(neighbours):
    """inter[i] = set(image top-k of i) & set(text top-k of i) without i (one list: its own)."""
    n = len(neighbours[0])
    return {i: sorted(set.intersection(*(set(nb[i].tolist()) for nb in neighbours)) - {i}) for i in range(n)}


def get_adj_mat(R, inter):
    """(norm_adj, R block): [[0, R], [R^T, item_adj]] with item_adj[i, v] = 1 for v in inter[i],
    D^-1/2 A D^-1/2 with row sums (inf -> 0)."""
    n_users, n_items = R.shape
    adj = np.zeros((n_users + n_items,) * 2)
    adj[:n_users, n_users:], adj[n_users:, :n_users] = R, R.T
    for i, vs in inter.items():
        adj[n_users + i, [n_users + v for v in vs]] = 1.0
    with np.errstate(divide="ignore"):
        d = adj.sum(1) ** -0.5
    d[np.isinf(d)] = 0.0
    norm = d[:, None] * adj * d[None, :]
    return norm, norm[:n_users, n_users:]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def conv_ui(adj, users, items, layers):
    ego = np.concatenate([users, items])
    out = [ego]
    for _ in range(layers):
        ego = adj @ ego
        out.append(ego)
    return np.mean(out, axis=0)


def forward(p, graphs, n_ui_layers=3, n_layers=2):
    """The official forward (train=True): dict of final, integ, ext_id, ext_it, x_image, x_text.
    p: parameters by official name (float64), ``image_embedding.weight`` / ``text_embedding.weight``
    the (trainable) features; graphs: (norm_adj, R, {modality: item graph})."""
    adj, r, g = graphs
    ext_id = conv_ui(adj, p["user_embedding.weight"], p["item_id_embedding.weight"], n_ui_layers)
    xs, ext = {}, {}
    for m in ("image", "text"):
        if m + "_embedding.weight" not in p:
            continue
        h = p["item_id_embedding.weight"] * sigmoid(linear(p, linear(p, p[m + "_embedding.weight"], m + "_reduce_dim"),
                                                              m + "_trans_dim.0"))
        for _ in range(n_layers):
            h = g[m] @ h
        xs[m] = np.concatenate([r @ h, h])
        ext[m] = conv_ui(adj, p[f"extended_{m}_user.weight"], h, n_ui_layers)
    if len(xs) == 2:
        # separate_coarse: Linear, Tanh, Linear (no bias); softmax over the two modalities' scores
        s = [linear(p, np.tanh(linear(p, xs[m], "separate_coarse.0")), "separate_coarse.2") for m in ("image", "text")]
        w_v = 1 / (1 + np.exp(s[1] - s[0]))  # the two-way softmax
        common = w_v * xs["image"] + (1 - w_v) * xs["text"]
        fine_v = sigmoid(linear(p, ext_id, "image_behavior.0")) * (xs["image"] - common)
        fine_t = sigmoid(linear(p, ext_id, "text_behavior.0")) * (xs["text"] - common)
        integ = (fine_v + fine_t + common) / 3
    else:
        integ = next(iter(xs.values())) / 2  # the documented single-modality form
    out = {"final": ext_id + integ, "integ": integ, "ext_id": ext_id, "ext_it": np.mean(list(ext.values()), axis=0)}
    return {**out, **{f"x_{m}": x for m, x in xs.items()}}


def loss(views, n_users, batch, w, noise, batch_size=2048):
    """calculate_loss; ``w``: the loss weights and temperatures by official name; ``noise(x)``: the
    perturbation's uniform draw for a WHOLE table x (official ``torch.rand_like``)."""
    users, pos, neg = batch
    split = {k: (v[:n_users], v[n_users:]) for k, v in views.items()}
    u, i = split["final"][0][users], split["final"][1]
    bpr = -np.mean(np.log(sigmoid((u * i[pos]).sum(1) - (u * i[neg]).sum(1))))
    reg1 = w["reg_weight_1"] * 0.5 * ((u ** 2).sum() + (i[pos] ** 2).sum() + (i[neg] ** 2).sum()) / batch_size
    vt = 0.0
    if "x_image" in views and "x_text" in views:
        a, b = views["x_image"], views["x_text"]
        vt = w["vt_loss"] * (abs(a.var(ddof=1) - b.var(ddof=1)) + abs(a.mean() - b.mean()))
    (integ_u, integ_i), (id_u, id_i), (it_u, it_i) = split["integ"], split["ext_id"], split["ext_it"]
    bm = w["bm_loss"] * (info_nce(integ_u[users], id_u[users], w["bm_temp"])
                         + info_nce(integ_i[pos], id_i[pos], w["bm_temp"]))

    def perturbed(x):
        r = noise(x)
        return x + np.sign(x) * r / np.linalg.norm(r, axis=1, keepdims=True) * 0.1

    def noise_loss(table):
        v1, v2 = perturbed(table), perturbed(table)
        return info_nce(v1[users], v2[users], w["um_temp"])

    c = info_nce(it_u[users], integ_u[users], w["um_temp"])
    um = w["um_loss"] * (c + noise_loss(integ_u) + noise_loss(it_u))
    reg2 = w["reg_weight_2"] * 0.5 * (it_i[pos] ** 2).sum() / batch_size
    return bpr + vt + bm + um + reg1 + reg2
