"""A dense re-derivation of SOIL as the official code computes it (TL-UESTC/SOIL @ 2ee898e,
``models/soil.py`` and ``utils/utils.py``), float64, loops over users written as in the official
``__init__``; for tests/test_mm_soil.py. Written from the official code, not from mllmrec.models.soil."""

from __future__ import annotations

import numpy as np
import torch


def build_sim(x):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return xn @ xn.T


def laplacian_sym(adj):
    """get_sparse_laplacian(nonzero entries of adj, 'sym'): row sums, d^-1/2 (inf -> 0), floor 1e-7."""
    with np.errstate(divide="ignore"):
        d = adj.sum(1) ** -0.5
    d[np.isinf(d)] = 0.0
    w = d[:, None] * adj * d[None, :]
    return np.where((adj != 0) & (w <= 1e-7), 1e-7, w)


def topk(v, k):
    return torch.topk(torch.from_numpy(np.ascontiguousarray(v)), k, dim=-1)


def boundary_ties(rows, k) -> int:
    """How many rows have equal k-th and (k+1)-th largest values (torch.topk's choice is arbitrary)."""
    s = -np.sort(-np.atleast_2d(rows), axis=1)
    return int((s[:, k - 1] == s[:, k]).sum()) if s.shape[1] > k else 0


def interest_ties(R, sims, knn_i, knn_k) -> int:
    """Boundary ties of the column sums (every user, modality) and of the kNN rows."""
    sums = [s[np.flatnonzero(r)].sum(0) for s in sims for r in R if r.any()]
    return boundary_ties(np.array(sums), knn_i) + sum(boundary_ties(s, knn_k) for s in sims)


def interest_adj(R, sims, knn_i, knn_k):
    """Per modality: build_non_zero_graph(interest) + build_knn_normalized_graph(S, knn_k)."""
    interests = [np.zeros_like(s) for s in sims]
    for u in range(R.shape[0]):
        items = np.flatnonzero(R[u])
        if len(items) == 0:
            continue
        cols = np.unique(np.concatenate([topk(s[items].sum(0), knn_i).indices.numpy() for s in sims]))
        for s, it in zip(sims, interests):
            it[np.ix_(items, cols)] += s[np.ix_(items, cols)]
    out = []
    for s, it in zip(sims, interests):
        val, ind = topk(s, knn_k)
        knn = np.zeros_like(s)
        np.put_along_axis(knn, ind.numpy(), val.numpy(), axis=1)
        out.append(laplacian_sym(it) + laplacian_sym(knn))
    return out


def second_order(R, sims, knn_a):
    """(mm_attractive_R raw U x I, users whose k-th and (k+1)-th block values tie)."""
    q = np.prod(sims, axis=0)
    A, tied = np.zeros(R.shape), []
    for u in range(R.shape[0]):
        items = np.flatnonzero(R[u])
        if len(items) == 0:
            continue
        k = knn_a + len(items)
        val, ind = topk(q[items], k)
        kval, kind = topk(val.flatten().numpy(), k)
        np.add.at(A[u], ind.flatten().numpy()[kind.numpy()], kval.numpy())
        block = np.sort(q[items].ravel())[::-1]
        if len(block) > k and block[k - 1] == block[k]:
            tied.append(u)
    return A, tied


def augmented_graphs(R, A):
    """(norm_adj + mm_attractive_adj / 2, R_n + mm_attractive_adj_R / 2), mm_R with the official
    column factor: the USER-degree vector read at the item id."""
    n_users, n_items = R.shape
    n = n_users + n_items
    adj, big = np.zeros((n, n)), np.zeros((n, n))
    adj[:n_users, n_users:], adj[n_users:, :n_users] = R, R.T
    big[:n_users, n_users:], big[n_users:, :n_users] = A, A.T
    with np.errstate(divide="ignore"):
        d = adj.sum(1) ** -0.5
        du = A.sum(1) ** -0.5
    d[np.isinf(d)], du[np.isinf(du)] = 0.0, 0.0
    norm_adj = d[:, None] * adj * d[None, :]
    w = du[:, None] * A * du[None, :n_items]
    mm_r = np.where((A != 0) & (w <= 1e-7), 1e-7, w)
    return norm_adj + laplacian_sym(big) / 2, norm_adj[:n_users, n_users:] + mm_r / 2


def linear(p, x, name):
    return x @ p[name + ".weight"].T + (p[name + ".bias"] if name + ".bias" in p else 0)


def branch(p, feats, m, r_aug, g, n_layers=1):
    """x_m = [R_aug h_m; h_m], h_m = G_m^n_layers (E_item * sigmoid(map_m(trs_m(X_m))))."""
    trs, mp = {"image": ("image_trs", "map_v.0"), "text": ("text_trs", "map_t.0")}[m]
    h = p["item_id_embedding.weight"] / (1 + np.exp(-linear(p, linear(p, feats[m], trs), mp)))
    for _ in range(n_layers):
        h = g[m] @ h
    return np.concatenate([r_aug @ h, h])


def forward(p, feats, graphs, n_ui_layers=2, n_layers=1):
    """(final, side, content) of the official forward; p: parameters by official name (float64)."""
    a_ui, r_aug, g = graphs
    ego = np.concatenate([p["user_embedding.weight"], p["item_id_embedding.weight"]])
    layers = [ego]
    for _ in range(n_ui_layers):
        layers.append(a_ui @ layers[-1])
    content = np.mean(layers, axis=0)
    xs = {m: branch(p, feats, m, r_aug, g, n_layers) for m in ("image", "text") if m in feats}
    if len(xs) == 2:
        def att(x):
            return linear(p, np.tanh(linear(p, x, "attention.0")), "attention.2")

        s = np.concatenate([att(xs["image"]), att(xs["text"])], 1)
        w = np.exp(s) / np.exp(s).sum(1, keepdims=True)
        common = w[:, :1] * xs["image"] + w[:, 1:] * xs["text"]
        side = (xs["image"] + xs["text"] - common) / 3
    else:
        side = next(iter(xs.values())) / 2  # the documented single-modality form (patched official)
    return content + side, side, content


def info_nce(v1, v2, t=0.2):
    """The official InfoNCE, written as a double loop over the batch."""
    v1 = v1 / np.linalg.norm(v1, axis=1, keepdims=True)
    v2 = v2 / np.linalg.norm(v2, axis=1, keepdims=True)
    out = 0.0
    for r in range(len(v1)):
        ttl = sum(np.exp(v1[r] @ v2[c] / t) for c in range(len(v2)))
        out += -np.log(np.exp(v1[r] @ v2[r] / t) / ttl)
    return out / len(v1)


def loss(final, side, content, n_users, users, pos, neg, cl_loss, cl_loss2):
    u, i = final[:n_users][users], final[n_users:]
    bpr = -np.mean(np.log(1 / (1 + np.exp(-((u * i[pos]).sum(1) - (u * i[neg]).sum(1))))))
    s_u, s_i, c_u, c_i = side[:n_users], side[n_users:], content[:n_users], content[n_users:]
    cl = info_nce(s_i[pos], c_i[pos]) + info_nce(s_u[users], c_u[users])
    cl2 = info_nce(u, c_i[pos]) + info_nce(u, s_i[pos])
    return bpr + cl_loss * cl + cl_loss2 * cl2
