"""Refined item-item graph (SPEC steps 6-12), sparse throughout.

No function here builds a dense |I| x |I| or |U| x |I| matrix: cosine similarities are computed
in row chunks and reduced to their top-K_s at once, and the Jaccard co-occurrence is a sparse
product of the training interaction matrix, also chunked and reduced to its top-K_c per row.

Ties in a top-k are broken by the smaller column index (co-occurrence values are small ratios
and tie often; duplicate item texts give equal cosines), so results are deterministic and
comparable with a dense reference. The cosine scores are NumPy GEMMs on CPU; the top-k selection
of each block runs in torch (same array, no copy).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # working memory for one chunk of similarity scores


def _chunks(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2, leave=False)


def _topk_rows_np(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest entries, ties broken by the smaller column; sorted by value (desc).

    The selection is ``torch.topk`` on the same array (no copy; ~25x faster than ``np.argpartition``
    on [256 x 200k] blocks here); rows where the k-th value ties with an entry left out are redone
    exactly (rare: duplicate items).
    """
    import torch

    t = torch.from_numpy(sim)
    vals, cols = torch.topk(t, k, dim=1)
    kth = vals[:, -1:]
    tied = ((t == kth).sum(1) > (vals == kth).sum(1)).nonzero().squeeze(1).tolist()
    cols, vals = cols.numpy(), vals.numpy()
    for r in tied:
        exact = np.lexsort((np.arange(sim.shape[1]), -sim[r]))[:k]
        cols[r], vals[r] = exact, sim[r, exact]
    cols.sort(axis=1)
    vals = np.take_along_axis(sim, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: equal values keep column order
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _topk_rows_torch(sim, k: int):
    import torch

    kth = torch.topk(sim, k, dim=1).values[:, -1:]
    gt = sim > kth
    eq = sim == kth
    need = k - gt.sum(dim=1, keepdim=True)
    take = gt | (eq & (torch.cumsum(eq.int(), dim=1) <= need))
    cols = take.nonzero()[:, 1].reshape(-1, k)
    vals = torch.gather(sim, 1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(cols, 1, order), torch.gather(vals, 1, order)


KNN_METHODS = ("exact", "ivf")
MIN_CHUNK_ROWS = 256  # a GEMM of fewer rows streams the whole feature matrix per few rows (slow at 200k items)


def knn_candidates(
    features: np.ndarray, k_s: int, chunk_size: int | None = None, device: str = "cpu", progress: bool = True,
    method: str = "exact", nlist: int | None = None, nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-K_s cosine neighbours of every item (Eq. 6-7, before the alpha threshold).

    Returns ``(indices, similarities)``, both ``[n_items, k]`` with k = min(K_s, n_items), each row
    sorted by decreasing similarity (ties: smaller item id first). As in the official code the item
    itself is always among its candidates (a self-loop with its own similarity, 1 for a non-zero
    vector), also when duplicate items tie with it. ``device`` "cpu" uses NumPy; "cuda" uses torch.

    ``method="ivf"``: FAISS's inverted-file index (``IndexIVFFlat``, inner product on the unit rows;
    ``nlist`` cells, default 4 sqrt(n); ``nprobe`` visited, default 32): approximate, for hundreds of
    thousands of items on CPU (its recall against exact is measured by ``mllmrec.bench.scale``);
    the item itself is still first. Needs ``pip install faiss-cpu``.
    """
    if method not in KNN_METHODS:
        raise ValueError(f"knn method must be one of {', '.join(KNN_METHODS)}, got {method!r}")
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    self_sim = (x * x).sum(1)
    n = x.shape[0]
    k = min(k_s, n)
    if method == "ivf":
        return _knn_ivf(x, self_sim, k, nlist, nprobe, progress)
    chunk = chunk_size or max(min(MIN_CHUNK_ROWS, n), CHUNK_BYTES // (4 * max(n, 1)))
    idx = np.empty((n, k), np.int64)
    val = np.empty((n, k), np.float32)
    if device != "cpu":
        import torch

        xt = torch.from_numpy(x).to(device)
    for start in _chunks(n, chunk, "graph: cosine top-k", progress):
        stop = min(start + chunk, n)
        rows = np.arange(stop - start)
        if device == "cpu":
            sim = x[start:stop] @ x.T
            sim[rows, start + rows] = np.inf  # the item itself first
            i, v = _topk_rows_np(sim, k)
        else:
            sim = xt[start:stop] @ xt.T
            r = torch.from_numpy(rows).to(sim.device)
            sim[r, start + r] = torch.inf
            i, v = (t.cpu().numpy() for t in _topk_rows_torch(sim, k))
        v[:, 0] = self_sim[start:stop]
        idx[start:stop], val[start:stop] = i, v
    return idx, val


def _knn_ivf(x: np.ndarray, self_sim: np.ndarray, k: int, nlist: int | None, nprobe: int | None, progress: bool):
    """Approximate top-k by FAISS IVF-Flat (inner product of unit rows), the item itself first."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - depends on the environment
        from mllmrec.errors import ConfigError

        raise ConfigError("graph.knn", "ivf needs FAISS: pip install faiss-cpu") from None
    n, d = x.shape
    nlist = int(nlist or max(1, min(n // 39, round(4 * np.sqrt(n)))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).permutation(n)[: min(n, 64 * nlist)]
    index.train(x[np.sort(sample)])
    index.add(x)
    index.nprobe = int(nprobe or min(nlist, 32))
    idx = np.empty((n, k), np.int64)
    val = np.empty((n, k), np.float32)
    chunk = 8192
    for start in _chunks(n, chunk, "graph: cosine top-k (ivf)", progress):
        stop = min(start + chunk, n)
        sims, cols = index.search(x[start:stop], k + 1)
        own = np.arange(start, stop)[:, None]
        # the item itself first, then the others in FAISS's order (best first), k in all
        other = (cols != own) & (cols >= 0)
        order = np.argsort(~other, axis=1, kind="stable")[:, : k - 1]
        idx[start:stop, 0] = own[:, 0]
        val[start:stop, 0] = self_sim[start:stop]
        got_c = np.take_along_axis(cols, order, 1)
        got_v = np.take_along_axis(sims, order, 1)
        missing = ~np.take_along_axis(other, order, 1)  # fewer than k found in the visited cells
        idx[start:stop, 1:] = np.where(missing, own, got_c)
        val[start:stop, 1:] = np.where(missing, -np.inf, got_v)
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


COOC_PRODUCTS = 1 << 23  # partial products (user-item-item paths) per co-occurrence chunk


def cooccurrence_chunks(items_users: sp.csr_matrix, user_degree: np.ndarray, max_rows: int,
                        max_products: int = COOC_PRODUCTS) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of at most ``max_rows`` items whose product rows hold at most
    ``max_products`` partial products in all (one item at least): the work of row a is the sum of
    its users' degrees, so a popular item, whose row of R^T R is nearly dense, gets a chunk of its own."""
    n = items_users.shape[0]
    paths = np.concatenate([[0.0], np.cumsum(user_degree[items_users.indices])])
    cum = paths[items_users.indptr]  # cum[a] = the work of rows 0..a-1
    out, start = [], 0
    while start < n:
        # the last row whose running total stays within the budget (at least one row)
        stop = int(np.searchsorted(cum, cum[start] + max_products, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_rows, n)
        out.append((start, stop))
        start = stop
    return out


def cooccurrence_topk(
    train: sp.spmatrix, k_c: int, chunk_size: int = 2048, progress: bool = True, max_products: int = COOC_PRODUCTS
) -> sp.csr_matrix:
    """Jaccard audience co-occurrence, top-K_c per row with its weights (Eq. 8-9).

    ``train`` is the binary users x items training matrix. c_ab = |U_a & U_b| / |U_a | U_b|; the
    diagonal is excluded; only positive entries are kept, so a row may hold fewer than K_c.
    R^T R is never materialised: rows are taken in chunks of at most ``chunk_size`` items and
    ``max_products`` partial products (:func:`cooccurrence_chunks`), and each chunk is reduced to
    its top-K_c at once. The result does not depend on the chunking.
    """
    items_users = sp.csr_matrix(train.T, dtype=np.float32)
    items_users.data[:] = 1.0
    n = items_users.shape[0]
    deg = np.asarray(items_users.getnnz(axis=1), np.float64)
    users_items = items_users.T.tocsr()
    user_degree = np.diff(users_items.indptr).astype(np.float64)
    chunks = cooccurrence_chunks(items_users, user_degree, chunk_size, max_products)
    out_r, out_c, out_v = [], [], []
    for start, stop in tqdm(chunks, desc="graph: co-occurrence", unit="chunk", disable=not progress or len(chunks) < 2,
                            leave=False):
        block = (items_users[start:stop] @ users_items).tocoo()
        r = block.row.astype(np.int64) + start
        c = block.col.astype(np.int64)
        inter = block.data.astype(np.float64)
        del block
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
