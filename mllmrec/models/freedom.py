"""FREEDOM (Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
Multimodal Recommendation", ACM MM 2023), as in MMRec's ``src/models/freedom.py``.

* Frozen item-item graph: per modality, the cosine kNN graph of the raw features (the item itself
  included), normalised D^-1/2 A D^-1/2 and computed once; modalities mixed as
  ``w_img * image + (1 - w_img) * text``. ``h = A_mm^L e_item``.
* Denoised user-item graph: each training epoch keeps ``(1 - dropout)`` of the training edges,
  drawn without replacement with probability proportional to 1/sqrt(d_u d_i) (degree-sensitive
  pruning), renormalised; LightGCN (mean over layers 0..L_ui) on it. Evaluation uses the full graph.
* ``y_ui = u . (i + h_i)``; loss = BPR + ``reg_weight`` x sum over modalities of BPR(u, W f_pos, W f_neg)
  with f the (trainable, initialised from the features) modality embeddings.
* ``refine=True`` (``graph.refine=true``): the frozen graph is the paper's refined graph on the
  same candidates, with ``alpha``, ``k_c``, ``denoise``, ``enhance`` of ``conf/graph``
  (interpolated in ``conf/model/freedom.yaml``; see :func:`mllmrec.models.knn_graphs.model_item_graph`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mllmrec.errors import ConfigError
from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.knn_graphs import model_item_graph, refine_settings
from mllmrec.models.layers import EdgeGraph, bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import bpr_logsigmoid
from mllmrec.models.modalities import require_modalities


def mixed_modality_graph(modalities: dict, k: int, image_weight: float, train_matrix, refine, weighted=False,
                         knn: str = "exact"):
    """The modality graphs mixed with ``image_weight`` (one modality: its graph alone); ``knn``: how the
    candidates are searched (``graph.knn``: exact, or FAISS ivf at 100k+ items)."""
    graphs = {m: model_item_graph(f, k, train_matrix, refine, weighted, knn) for m, f in modalities.items()}
    if len(graphs) == 1:
        return next(iter(graphs.values()))
    return (image_weight * graphs["image"] + (1.0 - image_weight) * graphs["text"]).tocsr()


def edge_keep_probabilities(train: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, 1/sqrt(d_u d_i)) of every training edge (FREEDOM's ``get_edge_info``)."""
    coo = sp.coo_matrix(train)
    deg_u = np.asarray(train.sum(1)).ravel() + 1e-7
    deg_i = np.asarray(train.sum(0)).ravel() + 1e-7
    return coo.row.astype(np.int64), coo.col.astype(np.int64), (deg_u[coo.row] * deg_i[coo.col]) ** -0.5


class FREEDOMModule(RankingModule):
    needs: ClassVar[str] = "modalities"

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 feat_embed_dim: int = 64, knn_k: int = 10, mm_layers: int = 1, ui_layers: int = 2,
                 mm_image_weight: float = 0.1, dropout: float = 0.8, reg_weight: float = 1e-4,
                 refine: bool = False, alpha: float = 0.7, k_c: int = 10, denoise: bool = True, enhance: bool = True,
                 knn: str = "exact"):
        super().__init__(optimizer)
        modalities, n_users, n_items = inputs.modalities, inputs.data.n_users, inputs.data.n_items
        require_modalities(modalities, "FREEDOM")
        if feat_embed_dim != d:
            raise ConfigError("model.feat_embed_dim", f"must equal model.d ({d}): FREEDOM scores users against it")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.refine = refine_settings(refine, alpha, k_c, denoise, enhance)
        self.n_users, self.n_items = n_users, n_items
        self.train_csr = sp.csr_matrix(inputs.data.train_matrix, dtype=np.float32)
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.mm_adj = EdgeGraph(mixed_modality_graph(modalities, knn_k, mm_image_weight, self.train_csr, self.refine,
                                                        knn=knn))
        self.feat = nn.ParameterDict({m: nn.Parameter(torch.from_numpy(f.copy())) for m, f in modalities.items()})
        self.trs = nn.ModuleDict({m: nn.Linear(f.shape[1], feat_embed_dim) for m, f in modalities.items()})
        self.norm_adj = bipartite_norm_adj(self.train_csr)
        self.masked_adj = self.norm_adj
        self._edges = edge_keep_probabilities(self.train_csr)

    def prune_edges(self) -> sp.csr_matrix:
        """The training graph of one epoch: degree-sensitive sampling of ``1 - dropout`` of the edges."""
        u, i, p = self._edges
        n_keep = int(len(p) * (1.0 - self.hparams.dropout))
        keep = torch.multinomial(torch.from_numpy(p), n_keep, replacement=False).numpy()
        return sp.csr_matrix((np.ones(n_keep, np.float32), (u[keep], i[keep])), shape=self.train_csr.shape)

    def on_train_epoch_start(self):
        if self.hparams.dropout > 0:
            self.masked_adj = bipartite_norm_adj(self.prune_edges()).to(self.device)

    def forward_graph(self, adj):
        h = self.item_emb
        for _ in range(self.hparams.mm_layers):
            h = self.mm_adj(h)
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        out = lightgcn_layers(adj, ego, int(self.hparams.ui_layers), reduce="mean")
        return out[: self.n_users], out[self.n_users:] + h

    def representations(self):
        return self.forward_graph(self.norm_adj)

    def batch_loss(self, users, pos, neg):
        h_u, h_i = self.forward_graph(self.masked_adj)
        u = rows(h_u, users)
        loss = bpr_logsigmoid(u, rows(h_i, pos), rows(h_i, neg))
        for m, feat in self.feat.items():
            f_pos, f_neg = self.trs[m](rows(feat, torch.cat([pos, neg]))).split(users.shape[0])
            loss = loss + self.hparams.reg_weight * bpr_logsigmoid(u, f_pos, f_neg)
        return loss
