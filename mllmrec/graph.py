"""Refined item-item graph (SPEC steps 6-12), sparse throughout.

No function here builds a dense |I| x |I| or |U| x |I| matrix: cosine similarities are computed
in row chunks and reduced to their top-K_s at once, and the Jaccard co-occurrence is a sparse
product of the training interaction matrix, also chunked and reduced to its top-K_c per row.

Ties in a top-k are broken by the smaller column index (co-occurrence values are small ratios
and tie often), so results are deterministic and comparable with a dense reference.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # working memory for one chunk of similarity scores


def _chunks(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2, leave=False)


def knn_candidates(
    features: np.ndarray, k_s: int, chunk_size: int | None = None, device: str = "cpu", progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Top-K_s cosine neighbours of every item (Eq. 6-7, before the alpha threshold).

    Returns ``(indices, similarities)``, both ``[n_items, k]`` with k = min(K_s, n_items), each row
    sorted by decreasing similarity. As in the official code the item itself is a candidate (its
    similarity is 1), so it normally keeps a self-loop.
    """
    x = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32, device=device)
    x = torch.nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    k = min(k_s, n)
    chunk = chunk_size or max(1, CHUNK_BYTES // (4 * max(n, 1)))
    idx = np.empty((n, k), np.int64)
    val = np.empty((n, k), np.float32)
    with torch.no_grad():
        for start in _chunks(n, chunk, "graph: cosine top-k", progress):
            sim = x[start : start + chunk] @ x.T
            v, i = torch.topk(sim, k, dim=1)
            idx[start : start + chunk] = i.cpu().numpy()
            val[start : start + chunk] = v.cpu().numpy()
    return idx, val


def _row_topk(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
    """Mask of the entries that are in the top-k of their row (ties: smaller column first)."""
    order = np.lexsort((cols, -vals, rows))
    rows_sorted = rows[order]
    first = np.searchsorted(rows_sorted, rows_sorted, side="left")
    rank = np.arange(len(rows_sorted)) - first
    keep = np.zeros(len(rows), bool)
    keep[order[rank < k]] = True
    return keep


def cooccurrence_topk(
    train: sp.spmatrix, k_c: int, chunk_size: int = 2048, progress: bool = True
) -> sp.csr_matrix:
    """Jaccard audience co-occurrence, top-K_c per row with its weights (Eq. 8-9).

    ``train`` is the binary users x items training matrix. c_ab = |U_a & U_b| / |U_a | U_b|; the
    diagonal is excluded; only positive entries are kept, so a row may hold fewer than K_c.
    """
    items_users = sp.csr_matrix(train.T, dtype=np.float32)
    items_users.data[:] = 1.0
    n = items_users.shape[0]
    deg = np.asarray(items_users.getnnz(axis=1), np.float64)
    users_items = items_users.T.tocsr()
    out_r, out_c, out_v = [], [], []
    for start in _chunks(n, chunk_size, "graph: co-occurrence", progress):
        block = (items_users[start : start + chunk_size] @ users_items).tocoo()
        r = block.row.astype(np.int64) + start
        c = block.col.astype(np.int64)
        inter = block.data.astype(np.float64)
        off_diag = r != c
        r, c, inter = r[off_diag], c[off_diag], inter[off_diag]
        jac = inter / (deg[r] + deg[c] - inter)
        keep = _row_topk(r, c, jac, k_c)
        out_r.append(r[keep])
        out_c.append(c[keep])
        out_v.append(jac[keep].astype(np.float32))
    rows = np.concatenate(out_r) if out_r else np.zeros(0, np.int64)
    cols = np.concatenate(out_c) if out_c else np.zeros(0, np.int64)
    vals = np.concatenate(out_v) if out_v else np.zeros(0, np.float32)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n), dtype=np.float32)


def denoised_knn(knn_idx: np.ndarray, knn_sim: np.ndarray, alpha: float | None) -> sp.csr_matrix:
    """S~ (Eq. 7): weight 1 where b is in the top-K_s of a and s_ab >= alpha (alpha None: no threshold)."""
    n, k = knn_idx.shape
    rows = np.repeat(np.arange(n), k)
    cols = knn_idx.ravel()
    keep = np.ones(rows.shape, bool) if alpha is None else knn_sim.ravel() >= alpha
    ones = np.ones(int(keep.sum()), np.float32)
    return sp.csr_matrix((ones, (rows[keep], cols[keep])), shape=(n, n), dtype=np.float32)


def sym_normalize(adj: sp.spmatrix) -> sp.csr_matrix:
    """N^{-1/2} S N^{-1/2} with N_aa = sum_b S_ab (row sums, as in the official code); empty rows stay 0."""
    adj = sp.csr_matrix(adj, dtype=np.float32)
    deg = np.asarray(adj.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        inv = np.where(deg > 0, deg.astype(np.float64) ** -0.5, 0.0).astype(np.float32)
    d = sp.diags(inv)
    return sp.csr_matrix(d @ adj @ d, dtype=np.float32)


def propagate(norm_adj: sp.spmatrix, features: np.ndarray, layers: int) -> np.ndarray:
    """E* = sum_{l=0..L} A^l E^(0) (Eq. 11-12), computed once."""
    e = np.ascontiguousarray(features, dtype=np.float32)
    total = e.copy()
    for _ in range(layers):
        e = np.asarray(norm_adj @ e, dtype=np.float32)
        total += e
    return total


def refine_item_graph(
    knn_idx: np.ndarray,
    knn_sim: np.ndarray,
    cooccurrence: sp.spmatrix | None,
    alpha: float | None = 0.7,
) -> sp.csr_matrix:
    """The paper's plug-and-play refinement: S* = S~ (alpha-denoised kNN) + C~ (top-K_c co-occurrence).

    Usable on any item-item similarity graph given as top-k candidates (``knn_idx``, ``knn_sim``):
    ``alpha=None`` keeps every candidate ("w/o GD"), ``cooccurrence=None`` adds nothing ("w/o TE").
    """
    adj = denoised_knn(knn_idx, knn_sim, alpha)
    if cooccurrence is not None:
        adj = (adj + sp.csr_matrix(cooccurrence, dtype=np.float32)).tocsr()
    adj.sum_duplicates()
    return adj
