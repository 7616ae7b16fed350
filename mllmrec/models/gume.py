"""GUME (Lin, Liu, Xu, Zhang, Chen, Li, "GUME: Graphs and User Modalities Enhancement for Long-Tail
Multimodal Recommendation", CIKM 2024), as in the authors' code NanGongNingYi/GUME @ 44a4dce
(``src/models/gume.py``; ``src/utils/utils.py``: ``build_sim``, ``build_knn_normalized_graph``,
``get_sparse_laplacian``; ``src/configs/model/GUME.yaml``, ``src/configs/overall.yaml``; MMRec's trainer).

Built once, from the training interactions R and the modality features X_m (image, text):

* per modality the kNN graph ``G_m = sym(kNN_knn_k(cos(X_m)))``: top-``knn_k`` cosines per row (the item
  itself included), raw values, ``D^-1/2 S D^-1/2`` with row-sum degrees;
* graph enhancement (``find_inter``/``add_edge``): ``P[i, j] = 1`` iff j is a neighbour of i in EVERY
  modality's graph and j != i (not symmetric); the user-item graph ``A = [[0, R], [R^T, P]]``,
  ``A_n = D^-1/2 A D^-1/2`` (row sums, 0 for an empty row), ``R_n = A_n[users, items]``.

Forward (``e_m = E_item * sigmoid(W'_m (W_m X_m + b_m) + b'_m)``, X_m trainable as in the official
``from_pretrained(freeze=False)``): ``ext_id`` = LightGCN over A_n of [E_user; E_item], mean over layers
0..n_ui_layers; explicit view ``h_m = G_m^n_layers e_m``, ``x_m = [R_n h_m; h_m]``; extended view
``ext_m`` = the same LightGCN of [E_user^m; h_m] (E_user^m a modality's own user table);
``ext_it = mean_m ext_m``; ``w = softmax(a(x_v), a(x_t))``, ``coarse = w_v x_v + w_t x_t``,
``fine_m = sigmoid(B_m ext_id + b) * (x_m - coarse)``, ``integ = (fine_v + fine_t + coarse) / 3``;
``final = ext_id + integ``, ``y_ui = final_u . final_i``.

Loss: BPR (logsigmoid) + reg_weight_1 * 1/2 (|u|^2 + |i|^2 + |j|^2) / batch_size
+ vt_loss * (|var x_v - var x_t| + |mean x_v - mean x_t|) (all rows and columns, unbiased var)
+ bm_loss * (NCE(integ_u, ext_id_u) + NCE(integ_pos, ext_id_pos); bm_temp)
+ um_loss * (NCE(ext_it_u, integ_u) + NCE(p(integ_u), p(integ_u)) + NCE(p(ext_it_u), p(ext_it_u)); um_temp)
+ reg_weight_2 * 1/2 |ext_it_pos|^2 / batch_size; NCE is in-batch InfoNCE (cosine), ``p(x) = x + sign(x)
* normalize(U[0, 1)^d) * 0.1`` drawn twice; ``batch_size`` the configured one; lr x 0.96^(epoch/50).

Same values, computed differently: the three LightGCNs are one propagation of the column-concatenated
tables (the mean over layers is linear); the contrastive terms run over the batch's distinct rows with
their multiplicities (:func:`mllmrec.models.losses.info_nce_over_rows`, the same value); the
perturbation is drawn for the batch's distinct users, not the whole user table (the same distribution).
Deviations, all where the official result is undefined or the official code cannot run:

* the neighbour sets are the graphs' rows of any length (``find_inter`` reads exactly 10 entries per
  row: it breaks for ``knn_k != 10`` and for a refined graph); an edge whose normalised weight is 0
  (cosine exactly 0) is not a neighbour here. Top-k ties (equal cosines): the order of
  :func:`mllmrec.item_graph.knn_candidates` (torch.topk's there).
* a non-positive degree (signed cosines summing to <= 0 over a row) gives inf/NaN weights there, the factor
  0 here (:func:`mllmrec.item_graph.sym_normalize`), so that item's edges are no neighbours either.
* one modality (office, text only; the official code needs both): P is the modality's own neighbours,
  no fuser and no vt term, ``integ = x_m / 2`` (``(fine_m + coarse) / (M + 1)`` with M = 1, where
  ``coarse = x_m`` makes ``fine_m = 0``), ``ext_it = ext_m``; logged.
* ``refine`` (``graph.refine=true``): each G_m is the paper's refined graph on the same candidates
  (:func:`mllmrec.models.knn_graphs.model_item_graph`); P follows the refined graphs' neighbours.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mllmrec.errors import ConfigError
from mllmrec.item_graph import sym_normalize
from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule, with_lr_decay
from mllmrec.models.knn_graphs import model_item_graph, refine_settings
from mllmrec.models.layers import CSRGraph, lightgcn_layers, rows
from mllmrec.models.losses import bpr_logsigmoid, info_nce_over_rows
from mllmrec.models.modalities import require_modalities

log = logging.getLogger(__name__)

NOISE_SCALE = 0.1  # cal_noise_loss: x + sign(x) * normalize(rand) * 0.1


def enhancement_edges(graphs: list[sp.spmatrix]) -> sp.csr_matrix:
    """``P`` (I x I, 0/1): j != i is a neighbour of i in every graph (``find_inter``, any row length)."""
    pattern = None
    for g in graphs:
        g = sp.csr_matrix(g, dtype=np.float32, copy=True)
        g.eliminate_zeros()
        g.data[:] = 1.0
        pattern = g if pattern is None else pattern.multiply(g).tocsr()
    pattern.setdiag(0)
    pattern.eliminate_zeros()
    return pattern


def enhanced_ui_graph(train: sp.spmatrix, item_edges: sp.spmatrix) -> sp.csr_matrix:
    """``D^-1/2 [[0, R], [R^T, P]] D^-1/2`` (row-sum degrees, 0 for an empty row): ``get_adj_mat``."""
    r = sp.csr_matrix(train, dtype=np.float32)
    adj = sp.bmat([[None, r], [r.T, sp.csr_matrix(item_edges, dtype=np.float32)]], format="csr")
    return sym_normalize(adj)


def uniform_like(x: torch.Tensor) -> torch.Tensor:
    """The perturbation's raw draw (``torch.rand_like``); a module function so tests can fix it."""
    return torch.rand_like(x)


def perturb(x: torch.Tensor) -> torch.Tensor:
    return x + torch.sign(x) * F.normalize(uniform_like(x), dim=-1) * NOISE_SCALE


def noise_nce(table: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """``cal_noise_loss``: InfoNCE between two perturbations of ``table[index]`` (drawn per distinct row,
    so a repeated row gets one draw per view, as the official whole-table draw)."""
    ids, inverse = torch.unique(index, return_inverse=True)
    x = rows(table, ids)
    return info_nce_over_rows(perturb(x), perturb(x), inverse, temperature)


def align_vt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``align_vt``: |var a - var b| + |mean a - mean b| over all entries (unbiased variance)."""
    return (torch.var(a) - torch.var(b)).abs() + (a.mean() - b.mean()).abs()


class GUMEModule(RankingModule):
    """``batch_size``: the configured training batch size, the official regularisers' divisor."""

    needs: ClassVar[str] = "modalities"

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 n_ui_layers: int = 3, n_layers: int = 2, knn_k: int = 10, bm_loss: float = 0.01,
                 bm_temp: float = 0.4, um_loss: float = 0.01, um_temp: float = 0.1, vt_loss: float = 0.1,
                 reg_weight_1: float = 1e-5, reg_weight_2: float = 0.1, batch_size: int = 2048,
                 lr_decay: float = 0.96, lr_decay_epochs: int = 50,
                 refine: bool = False, alpha: float = 0.7, k_c: int = 10, denoise: bool = True, enhance: bool = True):
        super().__init__(optimizer)
        modalities, data = inputs.modalities, inputs.data
        require_modalities(modalities, "GUME")
        if not 1 <= int(knn_k) <= data.n_items:
            raise ConfigError("model.knn_k", f"must be in [1, {data.n_items}] (the number of items), got {knn_k}")
        if int(batch_size) < 1:
            raise ConfigError("model.batch_size", f"must be >= 1, got {batch_size}")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.mods = [m for m in ("image", "text") if m in modalities]  # the official order: image, text
        self.n_users, self.n_items = data.n_users, data.n_items
        if len(self.mods) == 1:
            log.info("GUME with one modality (%s): graph enhancement from its own kNN graph, no fuser and no "
                     "vt alignment term, integration = x_%s / 2, extended_it = extended_%s", *self.mods * 3)
        # the official creation order (= its RNG order): nn.Embedding's normal draws, then xavier
        user, item = torch.empty(data.n_users, d).normal_(), torch.empty(data.n_items, d).normal_()
        self.user_emb, self.item_emb = nn.Parameter(nn.init.xavier_uniform_(user)), nn.Parameter(nn.init.xavier_uniform_(item))
        self.ext_user = nn.ParameterDict({m: self._xavier(data.n_users, d) for m in self.mods})
        self.feat = nn.ParameterDict({m: nn.Parameter(torch.from_numpy(modalities[m].copy())) for m in self.mods})
        self.space = nn.ModuleDict({m: nn.Sequential(nn.Linear(modalities[m].shape[1], d), nn.Linear(d, d),
                                                     nn.Sigmoid()) for m in self.mods})
        if len(self.mods) == 2:
            self.coarse = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
            self.behavior = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.Sigmoid()) for m in self.mods})
        self.build_graphs(sp.csr_matrix(data.train_matrix, dtype=np.float32), modalities,
                          refine_settings(refine, alpha, k_c, denoise, enhance))

    @staticmethod
    def _xavier(n: int, d: int) -> nn.Parameter:
        return nn.Parameter(nn.init.xavier_uniform_(torch.empty(n, d).normal_()))

    def build_graphs(self, train: sp.csr_matrix, modalities: dict, refine: dict | None) -> None:
        """G_m (``item_graph``), A_n (``ui_graph``) and R_n (``r_graph``), once."""
        knn = {m: model_item_graph(modalities[m], int(self.hparams.knn_k), train, refine, weighted=True)
               for m in self.mods}
        self.item_graph = nn.ModuleDict({m: CSRGraph(g) for m, g in knn.items()})
        norm = enhanced_ui_graph(train, enhancement_edges(list(knn.values())))
        self.ui_graph = CSRGraph(norm)
        self.r_graph = CSRGraph(norm[: self.n_users, self.n_users:])

    def explicit_items(self, m: str) -> torch.Tensor:
        """h_m = G_m^n_layers (E_item * space_m(X_m))."""
        h = self.item_emb * self.space[m](self.feat[m])
        for _ in range(int(self.hparams.n_layers)):
            h = self.item_graph[m](h)
        return h

    def embed(self) -> dict[str, torch.Tensor]:
        """Every (U + I) x d view of the official forward: final, integration, ext_id, ext_it, x_<m>."""
        hp, d = self.hparams, self.user_emb.shape[1]
        items = {m: self.explicit_items(m) for m in self.mods}
        users = torch.cat([self.user_emb] + [self.ext_user[m] for m in self.mods], 1)
        stacked = torch.cat([users, torch.cat([self.item_emb] + [items[m] for m in self.mods], 1)], 0)
        ext_id, *ext = lightgcn_layers(self.ui_graph, stacked, int(hp.n_ui_layers), reduce="mean").split(d, 1)
        xs = {m: torch.cat([self.r_graph(items[m]), items[m]], 0) for m in self.mods}
        if len(self.mods) == 2:
            x_v, x_t = xs["image"], xs["text"]
            w = torch.softmax(torch.cat([self.coarse(x_v), self.coarse(x_t)], 1), dim=1)
            coarse = w[:, :1] * x_v + w[:, 1:] * x_t
            fine = [self.behavior[m](ext_id) * (xs[m] - coarse) for m in self.mods]
            integ = (fine[0] + fine[1] + coarse) / 3
        else:
            integ = xs[self.mods[0]] / 2
        views = {"final": ext_id + integ, "integ": integ, "ext_id": ext_id, "ext_it": sum(ext) / len(ext)}
        return {**views, **{f"x_{m}": x for m, x in xs.items()}}

    def representations(self):
        final = self.embed()["final"]
        return final[: self.n_users], final[self.n_users:]

    def batch_loss(self, users, pos, neg):
        hp, views = self.hparams, self.embed()
        v = {k: t.split([self.n_users, self.n_items]) for k, t in views.items()}
        u, p, n = rows(v["final"][0], users), rows(v["final"][1], pos), rows(v["final"][1], neg)
        bs = int(hp.batch_size)
        reg1 = 0.5 * (u.square().sum() + p.square().sum() + n.square().sum()) / bs
        reg2 = 0.5 * rows(v["ext_it"][1], pos).square().sum() / bs
        bm = (info_nce_over_rows(v["integ"][0], v["ext_id"][0], users, hp.bm_temp)
              + info_nce_over_rows(v["integ"][1], v["ext_id"][1], pos, hp.bm_temp))
        um = (info_nce_over_rows(v["ext_it"][0], v["integ"][0], users, hp.um_temp)
              + noise_nce(v["integ"][0], users, hp.um_temp) + noise_nce(v["ext_it"][0], users, hp.um_temp))
        loss = bpr_logsigmoid(u, p, n) + hp.bm_loss * bm + hp.um_loss * um
        if len(self.mods) == 2:
            loss = loss + hp.vt_loss * align_vt(views["x_image"], views["x_text"])
        return loss + hp.reg_weight_1 * reg1 + hp.reg_weight_2 * reg2

    def configure_optimizers(self):
        return with_lr_decay(super().configure_optimizers(), float(self.hparams.lr_decay),
                             float(self.hparams.lr_decay_epochs))
