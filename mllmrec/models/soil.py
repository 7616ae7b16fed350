"""SOIL (Su, Li, Li, Lu, Zhu, "SOIL: Contrastive Second-Order Interest Learning for Multimodal
Recommendation", ACM MM 2024), as in the authors' code TL-UESTC/SOIL @ 2ee898e8 (``models/soil.py``;
``utils/utils.py``: ``build_sim``, ``build_non_zero_graph``, ``build_knn_normalized_graph``,
``build_graph_from_adj``, ``get_sparse_laplacian``; ``configs/model/SOIL.yaml``, ``configs/dataset/*.yaml``).

Built once, from the training interactions R and the L2-normalised modality features (S_m = cosine):

* interest-aware item graph per modality: ``G_m = sym(S_m .* R^T C) + sym(kNN_knn_k(S_m))``, C[u, c] = 1
  iff c is in the top-``knn_i`` of ``sum_{h in H_u} S_m'[h]`` for some modality m' (union); the kNN part
  is weighted by the raw cosine (self-loop included); the two terms are normalised apart and added;
* second-order edges A (U x I): per user, the ``k = knn_a + |H_u|`` largest entries of the block
  ``prod_m S_m[H_u, :]`` (an item picked twice gets the sum); ``A_ui = norm_adj + sym(A)/2`` (N x N),
  ``R_aug = R_n + symR(A)/2`` (U x I), with R_n the normalised train block.
* ``sym``: SOIL's ``get_sparse_laplacian``: row-sum degrees (signed), ``d^-1/2`` with 0 for 0, then
  every weight <= 1e-7 set to 1e-7.

Forward: ``content`` = LightGCN over A_ui, mean over layers 0..n_ui_layers; per modality
``e_m = E_item * sigmoid(map_m(trs_m(X_m)))``, ``h_m = G_m^n_layers e_m``, ``x_m = [R_aug h_m; h_m]``;
attention fuser ``w = softmax(a(x_v), a(x_t))``, ``common = w_v x_v + w_t x_t``,
``side = (x_v + x_t - common) / 3``; ``final = content + side``, ``y_ui = final_u . final_i``.
Loss: BPR (logsigmoid) + ``cl_loss`` (InfoNCE(side, content) on items and users) + ``cl_loss2``
(InfoNCE(final_u, content_pos) + InfoNCE(final_u, side_pos)), tau 0.2; lr x 0.96^(epoch/50).
``knn_i`` / ``knn_a`` null: the official dataset yaml's (baby 10/2, sports 5/6, clothing 5/3); other
datasets (office) get baby's, logged, as the official office run did (the repo has no office yaml).

Same values, computed differently: the official code builds several dense I x I matrices and loops
over users in Python; here every graph is sparse and vectorised (similarities in row chunks, the
column sums as ``(R X) X^T``, the counts as ``R^T C``, the second-order block from per-item top-K
candidates, no |I|x|I| or |U|x|U| matrix). Deviations, all where the official result is undefined:

* ties at the k-th second-order slot (a pair i, j inside H_u gives two exactly equal entries): the
  official ``torch.topk`` order decides (device-dependent); here the entry of the smaller history item
  wins, then the smaller column, i.e. the larger item of the pair gets the value. Row sums unchanged.
  Other top-k ties (duplicate feature rows; the two items of a 2-item history have equal column
  sums): smaller item id first.
* ``mm_r_norm=official`` reproduces the official normalisation of the U x I second-order block, whose
  column factor reads the USER-degree vector at ITEM ids; with more items than users that is an index
  error there and a one-line ConfigError here (``mm_r_norm=item_degrees``: item degrees, logged).
* a negative degree (signed features) gives NaN weights there (the model's output is NaN): here the
  factor 0 of an empty row (so the 1e-7 floor), with a warning; an all-zero feature row gives cosines
  0 here (NaN there); ``knn_a + |H_u| > I`` or ``knn_i``/``knn_k > I`` (a topk error there) are ConfigErrors.
* one modality (office, text only; the official code needs both): interest columns and second-order
  similarity from it alone, no fuser, ``side = x_m / 2`` (MGCN's ``(sum_m (x_m - common) + common) /
  (M + 1)`` of which the official formula is the M = 2 case); logged. ``reg_weight``, ``lambda_coeff``
  (unused in the official code) are not taken.
* ``refine`` (``graph.refine=true``): the kNN term of each G_m is the paper's refined graph on the same
  candidates (:func:`mllmrec.models.knn_graphs.model_item_graph`); interest and second-order unchanged.
* norm_adj / R_n: the house ``bipartite_norm_adj`` (+1e-7 in the degrees; SOIL's has none: 1e-7 relative).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mllmrec.errors import ConfigError
from mllmrec.item_graph import knn_candidates
from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule, with_lr_decay
from mllmrec.models.knn_graphs import model_item_graph, refine_settings
from mllmrec.models.layers import CSRGraph, SymmetricGraph, bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import bpr_logsigmoid, in_batch_info_nce, info_nce_over_rows
from mllmrec.models.modalities import require_modalities

log = logging.getLogger(__name__)

OFFICIAL_KNN = {"baby": (10, 2), "sports": (5, 6), "clothing": (5, 3)}  # configs/dataset/*.yaml: knn_i, knn_a
FLOOR = 1e-7  # get_sparse_laplacian: weights <= 1e-7 become 1e-7
TAU = 0.2
CHUNK_BYTES = 64 << 20  # working memory of one block of similarity scores


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (``build_sim``); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def inv_sqrt_degrees(deg: np.ndarray, what: str) -> np.ndarray:
    """``deg^-1/2``, 0 where deg is 0 (official: inf -> 0); negative: official NaN, here 0 (warned)."""
    neg = int((deg < 0).sum())
    if neg:
        log.warning("SOIL %s: %d negative degree(s) (signed similarities): factor 0 there (official: NaN)", what, neg)
    with np.errstate(divide="ignore"):
        return np.where(deg > 0, np.abs(deg) ** -0.5, 0.0)


def soil_norm(r: np.ndarray, c: np.ndarray, v: np.ndarray, inv_r: np.ndarray, inv_c: np.ndarray) -> np.ndarray:
    """SOIL's normalised weights ``inv_r[r] * v * inv_c[c]`` with the 1e-7 floor (float32)."""
    w = (inv_r[r] * v * inv_c[c]).astype(np.float32)
    return np.where(w <= FLOOR, np.float32(FLOOR), w)


def sym_graph(r: np.ndarray, c: np.ndarray, v: np.ndarray, n: int, what: str) -> sp.csr_matrix:
    """``get_sparse_laplacian(..., 'sym')`` of the n x n matrix given by its entries (row-sum degrees)."""
    inv = inv_sqrt_degrees(np.bincount(r, weights=v, minlength=n), what)
    return sp.csr_matrix((soil_norm(r, c, v, inv, inv), (r, c)), shape=(n, n))


def topk_desc(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the k largest scores and their columns, sorted by value (desc); exact ties: smaller column."""
    n = scores.shape[1]
    vals, cols = torch.topk(scores, min(k + 1, n), dim=1)
    if k < n:  # a tie across the boundary: redo those rows with a stable sort (smaller column first)
        for r in torch.nonzero(vals[:, k - 1] == vals[:, k]).flatten().tolist():
            v_r, c_r = torch.sort(scores[r], descending=True, stable=True)
            vals[r], cols[r] = v_r[: k + 1], c_r[: k + 1]
    vals, cols = vals[:, :k], cols[:, :k]
    by_col = torch.sort(cols, dim=1).indices  # equal values keep the column order
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_BYTES // (4 * max(n_cols, 1)))
    return ((s, min(s + step, n_rows)) for s in range(0, n_rows, step))


def interest_columns(train: sp.csr_matrix, xns: list[np.ndarray], knn_i: int) -> sp.csr_matrix:
    """C (U x I, 0/1): C[u, c] = 1 iff c is in the top-knn_i of ``sum_{h in H_u} S_m[h]`` for some m.
    The column sums are ``(R_u X_m) X_m^T``: no I x I matrix."""
    users = np.flatnonzero(train.getnnz(axis=1))
    out_r, out_c = [], []
    for s, e in _row_chunks(len(users), train.shape[1]):
        block = train[users[s:e]]
        for xn in xns:
            scores = torch.from_numpy(np.asarray(block @ xn, np.float32)) @ torch.from_numpy(xn).T
            cols = topk_desc(scores, knn_i)[1].numpy()
            out_r.append(np.repeat(users[s:e], cols.shape[1]))
            out_c.append(cols.ravel())
    r, c = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (out_r, out_c))
    cmat = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=train.shape)
    cmat.data[:] = 1.0  # the union: an item chosen by two modalities counts once
    return cmat


def pair_cosines(xn: np.ndarray, r: np.ndarray, c: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``<xn[r_j], xn[c_j]>`` for every pair j, in chunks."""
    out = np.empty(len(r), np.float32)
    for s in range(0, len(r), chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", xn[r[s:s + chunk]], xn[c[s:s + chunk]])
    return out


def weighted_knn_graph(xn: np.ndarray, knn_k: int, what: str) -> sp.csr_matrix:
    """``build_knn_normalized_graph(S, knn_k, 'sym')``: the top-knn_k cosines of each row (self
    included), raw values, SOIL-normalised."""
    idx, sim = knn_candidates(xn, knn_k, progress=False)
    n, k = idx.shape
    return sym_graph(np.repeat(np.arange(n), k), idx.ravel(), sim.ravel().astype(np.float64), n, what)


def interest_graphs(train: sp.csr_matrix, xns: dict[str, np.ndarray], knn_i: int) -> dict[str, sp.csr_matrix]:
    """Per modality, ``sym(nonzero(S_m .* count))`` with count = R^T C (the official user loop's ``+=``)."""
    count = (train.T @ interest_columns(train, list(xns.values()), knn_i)).tocoo()
    r, c = count.row.astype(np.int64), count.col.astype(np.int64)
    out = {}
    for m, xn in xns.items():
        v = count.data.astype(np.float64) * pair_cosines(xn, r, c)
        keep = v != 0  # build_non_zero_graph
        out[m] = sym_graph(r[keep], c[keep], v[keep], train.shape[1], f"interest graph ({m})")
    return out


def product_candidates(xns: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the top-k of its row of ``prod_m S_m`` (I x k columns and values, sorted desc)."""
    n = xns[0].shape[0]
    idx, val = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    feats = [torch.from_numpy(xn) for xn in xns]
    for s, e in _row_chunks(n, n):
        q = feats[0][s:e] @ feats[0].T
        for f in feats[1:]:
            q.mul_(f[s:e] @ f.T)
        v, i = topk_desc(q, k)
        idx[s:e], val[s:e] = i.numpy(), v.numpy()
    return idx, val


def second_order_edges(train: sp.csr_matrix, xns: list[np.ndarray], knn_a: int) -> sp.csr_matrix:
    """A (U x I): per user u, the k_u = knn_a + |H_u| largest entries of ``prod_m S_m[H_u, :]``, an item
    picked twice summed. The first k_u candidates of each h in H_u hold them; ties (see the module
    doc): the smaller history item h, then the smaller column."""
    coo = train.tocoo()
    u, h = coo.row.astype(np.int64), coo.col.astype(np.int64)
    n_u = train.getnnz(axis=1).astype(np.int64)
    k_e = knn_a + n_u[u]
    cand_i, cand_v = product_candidates(xns, int(k_e.max()) if len(k_e) else 1)
    rep = np.repeat(np.arange(len(u)), k_e)
    rank = np.arange(len(rep)) - np.repeat(np.cumsum(k_e) - k_e, k_e)
    users, rows_h = u[rep], h[rep]
    items, vals = cand_i[rows_h, rank], cand_v[rows_h, rank]
    order = np.lexsort((items, rows_h, -vals, users))
    users, items, vals = users[order], items[order], vals[order]
    pos = np.arange(len(users)) - np.searchsorted(users, users, side="left")
    keep = pos < knn_a + n_u[users]
    a = sp.csr_matrix((vals[keep].astype(np.float64), (users[keep], items[keep])), shape=train.shape)
    a.sum_duplicates()
    return a


def second_order_graphs(a: sp.csr_matrix, mm_r_norm: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(``mm_attractive_adj`` N x N, ``mm_attractive_adj_R`` U x I), normalised as the official
    ``build_graph_from_adj``; ``official``: the U x I one reads user degrees at item ids."""
    n_users, n_items = a.shape
    coo = a.tocoo()
    r, c, v = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    inv_u = inv_sqrt_degrees(np.bincount(r, weights=v, minlength=n_users), "second-order users")
    inv_i = inv_sqrt_degrees(np.bincount(c, weights=v, minlength=n_items), "second-order items")
    w = sp.csr_matrix((soil_norm(r, c, v, inv_u, inv_i), (r, c)), shape=a.shape)
    big = sp.bmat([[None, w], [w.T, None]], format="csr")
    if mm_r_norm == "item_degrees":
        return big, w
    return big, sp.csr_matrix((soil_norm(r, c, v, inv_u, inv_u[:n_items]), (r, c)), shape=a.shape)


def official_knn(dataset: str, knn_i: int | None, knn_a: int | None) -> tuple[int, int]:
    """``knn_i``, ``knn_a``: the given ones, else the official dataset yaml's (other datasets: baby's)."""
    if knn_i is not None and knn_a is not None:
        return int(knn_i), int(knn_a)
    base = dataset if dataset in OFFICIAL_KNN else "baby"
    if base != dataset:
        log.info("SOIL: no official knn_i/knn_a for dataset %r: baby's %s, as the official office run did",
                 dataset, OFFICIAL_KNN[base])
    return int(OFFICIAL_KNN[base][0] if knn_i is None else knn_i), int(OFFICIAL_KNN[base][1] if knn_a is None else knn_a)


def check_settings(train: sp.csr_matrix, knn_k: int, knn_i: int, knn_a: int, mm_r_norm: str) -> None:
    """One-line errors where the official code would fail (a topk over more than I items, the
    user-degree lookup at item ids with more items than users) or a setting is unknown."""
    n_users, n_items = train.shape
    if mm_r_norm not in ("official", "item_degrees"):
        raise ConfigError("model.mm_r_norm", f"must be official or item_degrees, got {mm_r_norm!r}")
    for key, k in (("knn_k", knn_k), ("knn_i", knn_i)):
        if not 1 <= k <= n_items:
            raise ConfigError(f"model.{key}", f"must be in [1, {n_items}] (the number of items), got {k}")
    n_u = train.getnnz(axis=1)
    if knn_a < 0 or knn_a + n_u.max(initial=0) > n_items:
        raise ConfigError("model.knn_a", f"knn_a + |H_u| = {knn_a + n_u.max(initial=0)} (user {int(n_u.argmax())}) "
                          f"must be in [0, {n_items}] (the number of items; the official topk fails too)")
    if mm_r_norm == "official" and n_items > n_users:
        raise ConfigError("model.mm_r_norm", f"official reads the user-degree vector at item ids (SOIL's "
                          f"build_graph_from_adj on mm_attractive_R) and needs items <= users, got {n_items} items "
                          f"> {n_users} users (an index error in the official code): set model.mm_r_norm=item_degrees")
    if mm_r_norm == "item_degrees":
        log.info("SOIL: mm_r_norm=item_degrees: the U x I second-order block normalised with item degrees (official: "
                 "user degrees read at item ids)")


class SOILModule(RankingModule):
    """``knn_i``/``knn_a`` None: the official per-dataset values (see the module doc)."""

    needs: ClassVar[str] = "modalities"
    # the attention over modalities and a missing modality's mapping get no gradient in some
    # configurations (one modality, e.g. office's text): DDP must find the unused parameters
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 n_ui_layers: int = 2, n_layers: int = 1, knn_k: int = 10, knn_i: int | None = None,
                 knn_a: int | None = None, cl_loss: float = 0.01, cl_loss2: float = 0.01, lr_decay: float = 0.96,
                 lr_decay_epochs: int = 50, mm_r_norm: str = "official",
                 refine: bool = False, alpha: float = 0.7, k_c: int = 10, denoise: bool = True, enhance: bool = True):
        super().__init__(optimizer)
        modalities, data = inputs.modalities, inputs.data
        require_modalities(modalities, "SOIL")
        self.mods = [m for m in ("image", "text") if m in modalities]  # the official order: image, text
        knn_i, knn_a = official_knn(data.name, knn_i, knn_a)
        train = sp.csr_matrix(data.train_matrix, dtype=np.float32)
        check_settings(train, knn_k, knn_i, knn_a, mm_r_norm)
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.hparams.update(knn_i=knn_i, knn_a=knn_a)
        self.n_users, self.n_items = data.n_users, data.n_items
        if len(self.mods) == 1:
            log.info("SOIL with one modality (%s): interest columns and second-order similarity from it alone, no "
                     "attention fuser, side = x_%s / 2 (the fuser and the other map are created, unused)", *self.mods * 2)
        # the official creation order (= its RNG order): nn.Embedding's normal draws, then xavier
        user, item = torch.empty(data.n_users, d).normal_(), torch.empty(data.n_items, d).normal_()
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(user))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(item))
        for m in self.mods:
            self.register_buffer(f"feat_{m}", torch.from_numpy(modalities[m].copy()), persistent=False)
        self.build_graphs(train, modalities, refine_settings(refine, alpha, k_c, denoise, enhance))
        self.trs = nn.ModuleDict({m: nn.Linear(modalities[m].shape[1], d) for m in self.mods})
        self.attention = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
        self.map = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.Sigmoid()) for m in ("image", "text")})

    def unreached_parameters(self) -> set[str]:
        """One modality: the attention fuser and the other modality's map are created (the official
        creation order) but unused."""
        if len(self.mods) == 2:
            return set()
        unused = ("attention.", *(f"map.{m}." for m in ("image", "text") if m not in self.mods))
        return {n for n, _ in self.named_parameters() if n.startswith(unused)}

    def build_graphs(self, train: sp.csr_matrix, modalities: dict, refine: dict | None) -> None:
        """G_m (``item_graph``), A_ui (``ui_graph``) and R_aug (``r_graph``), once."""
        hp = self.hparams
        xns = {m: unit_rows(modalities[m]) for m in self.mods}
        interest = interest_graphs(train, xns, hp.knn_i)
        knn = {m: model_item_graph(modalities[m], hp.knn_k, train, refine, weighted=True) if refine
               else weighted_knn_graph(xns[m], hp.knn_k, f"kNN graph ({m})") for m in self.mods}
        self.item_graph = nn.ModuleDict({m: CSRGraph(interest[m] + knn[m]) for m in self.mods})
        big, small = second_order_graphs(second_order_edges(train, list(xns.values()), hp.knn_a), hp.mm_r_norm)
        norm = bipartite_norm_adj(train).csr
        self.ui_graph = SymmetricGraph(norm + big / 2)
        self.r_graph = CSRGraph(norm[: self.n_users, self.n_users:] + small / 2)

    def branch(self, m: str) -> torch.Tensor:
        """x_m = [R_aug h_m; h_m], h_m = G_m^n_layers (E_item * sigmoid(map_m(trs_m(X_m))))."""
        h = self.item_emb * self.map[m](self.trs[m](getattr(self, f"feat_{m}")))
        for _ in range(int(self.hparams.n_layers)):
            h = self.item_graph[m](h)
        return torch.cat([self.r_graph(h), h], 0)

    def embed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final, side, content), each (U + I) x d."""
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        content = lightgcn_layers(self.ui_graph, ego, int(self.hparams.n_ui_layers), reduce="mean")
        xs = [self.branch(m) for m in self.mods]
        if len(xs) == 2:
            w = torch.softmax(torch.cat([self.attention(x) for x in xs], 1), dim=1)
            side = (xs[0] + xs[1] - (w[:, :1] * xs[0] + w[:, 1:] * xs[1])) / 3
        else:
            side = xs[0] / 2
        return content + side, side, content

    def representations(self):
        final = self.embed()[0]
        return final[: self.n_users], final[self.n_users:]

    def batch_loss(self, users, pos, neg):
        final, side, content = (t.split([self.n_users, self.n_items]) for t in self.embed())
        u, p = rows(final[0], users), rows(final[1], pos)
        side_p, content_p = rows(side[1], pos), rows(content[1], pos)
        # both sides on the same rows: over the distinct rows with multiplicities (same value, less work)
        cl = info_nce_over_rows(side[1], content[1], pos, TAU) + info_nce_over_rows(side[0], content[0], users, TAU)
        cl2 = in_batch_info_nce(u, content_p, TAU) + in_batch_info_nce(u, side_p, TAU)
        bpr = bpr_logsigmoid(u, p, rows(final[1], neg))
        return bpr + self.hparams.cl_loss * cl + self.hparams.cl_loss2 * cl2

    def configure_optimizers(self):
        return with_lr_decay(super().configure_optimizers(), float(self.hparams.lr_decay),
                             float(self.hparams.lr_decay_epochs))
