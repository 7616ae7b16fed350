"""LATTICE (Zhang et al., "Mining Latent Structures for Multimedia Recommendation", ACM MM 2021),
as in MMRec's ``src/models/lattice.py`` with its LightGCN backbone (``cf_model: lightgcn``).

* Original graphs: per modality, the similarity-weighted cosine top-k graph of the raw features,
  normalised D^-1/2 S D^-1/2, computed once (sparse, chunked).
* Learned graphs: the same on the projected, trainable features ``W_m f_m + b_m``, rebuilt at the
  first training batch of every epoch (with gradient into the projections and the modality
  weights) and reused, detached, for the epoch's other batches; the top-k search runs in chunks.
* ``A = (1 - lambda) norm(sum_m w_m S^learned_m) + lambda sum_m w_m A^orig_m``, w = softmax;
  ``h = A^L e_item``; LightGCN (mean over layers 0..L_ui) over the row-normalised user-item graph
  with self-loops, D^-1 (R + I); ``y_ui = u . (i + h_i / |h_i|)``.
* Loss: BPR + ``reg_weight`` x (|u|^2 + |i|^2 + |j|^2) / (2 B); learning rate x 0.96^(epoch/50).
* ``refine=True`` (``graph.refine=true``): the original (frozen, weight lambda) graph is the
  paper's refined graph on the same candidates, with ``alpha``, ``k_c``, ``denoise``, ``enhance``
  of ``conf/graph`` (interpolated in ``conf/model/lattice.yaml``); the learned graph is unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mllmrec.errors import ConfigError
from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule, adam, with_lr_decay
from mllmrec.models.knn_graphs import learned_knn_edges, model_item_graph, refine_settings
from mllmrec.models.layers import EdgeGraph, edge_matmul, lightgcn_layers, normalize_edges, rows
from mllmrec.models.losses import bpr_logsigmoid
from mllmrec.models.modalities import require_modalities


def row_norm_adj_with_self_loops(train: sp.spmatrix) -> sp.csr_matrix:
    """D^-1 (A + I) of the (users + items) bipartite training graph (LATTICE's ``get_adj_mat``)."""
    train = sp.csr_matrix(train, dtype=np.float32)
    adj = sp.bmat([[None, train], [train.T, None]], format="csr", dtype=np.float32)
    adj = adj + sp.eye(adj.shape[0], dtype=np.float32, format="csr")
    deg = np.asarray(adj.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / deg) @ adj, dtype=np.float32)


class LATTICEModule(RankingModule):
    """``optimizer`` None: Adam at MMRec's lr 5e-4; ``lr_decay``/``lr_decay_epochs``: its schedule."""

    needs: ClassVar[str] = "modalities"
    # the item graph is learned on an epoch's first batch only (later ones reuse it detached), and
    # modal_weight gets no gradient with one modality: DDP must find the unused parameters
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 feat_embed_dim: int = 64, knn_k: int = 10, lambda_coeff: float = 0.9, item_layers: int = 1,
                 ui_layers: int = 2, reg_weight: float = 1e-4, lr_decay: float = 0.96, lr_decay_epochs: int = 50,
                 refine: bool = False, alpha: float = 0.7, k_c: int = 10, denoise: bool = True, enhance: bool = True):
        super().__init__(optimizer or adam(lr=5e-4))
        modalities, n_users, n_items = inputs.modalities, inputs.data.n_users, inputs.data.n_items
        require_modalities(modalities, "LATTICE")
        if not 0.0 <= lambda_coeff <= 1.0:
            raise ConfigError("model.lambda_coeff", f"must be in [0, 1], got {lambda_coeff}")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.refine = refine_settings(refine, alpha, k_c, denoise, enhance)
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.feat = nn.ParameterDict({m: nn.Parameter(torch.from_numpy(f.copy())) for m, f in modalities.items()})
        self.trs = nn.ModuleDict({m: nn.Linear(f.shape[1], feat_embed_dim) for m, f in modalities.items()})
        self.modal_weight = nn.Parameter(torch.full((len(modalities),), 0.5))
        train = sp.csr_matrix(inputs.data.train_matrix, dtype=np.float32)
        self.original = nn.ModuleDict(
            {m: EdgeGraph(model_item_graph(f, knn_k, train, self.refine, weighted=True)) for m, f in modalities.items()})
        self.ui_adj = EdgeGraph(row_norm_adj_with_self_loops(train))
        self._rebuild = True
        self._item_adj = None

    def unreached_parameters(self) -> set[str]:
        """One modality: its softmax weight is 1 whatever ``modal_weight`` holds (no gradient)."""
        return {"modal_weight"} if len(self.feat) == 1 else set()

    def item_adj(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edges of A = (1 - lambda) norm(learned) + lambda original, modalities mixed by softmax weights."""
        lam = float(self.hparams.lambda_coeff)
        w = torch.softmax(self.modal_weight, 0)
        learned = [learned_knn_edges(self.trs[m](self.feat[m]), int(self.hparams.knn_k)) for m in self.feat]
        l_rows = torch.cat([r for r, _, _ in learned])
        l_cols = torch.cat([c for _, c, _ in learned])
        l_vals = torch.cat([w[j] * v for j, (_, _, v) in enumerate(learned)]) if len(learned) > 1 else learned[0][2]
        l_vals = normalize_edges(l_rows, l_cols, l_vals, self.n_items)
        orig = list(self.original.values())
        o_vals = [g.vals * (w[j] if len(orig) > 1 else 1.0) for j, g in enumerate(orig)]
        return (torch.cat([l_rows] + [g.rows for g in orig]), torch.cat([l_cols] + [g.cols for g in orig]),
                torch.cat([(1 - lam) * l_vals] + [lam * v for v in o_vals]))

    def forward_graph(self, edges):
        h = self.item_emb
        for _ in range(int(self.hparams.item_layers)):
            h = edge_matmul(*edges, h, self.n_items)
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        out = lightgcn_layers(self.ui_adj, ego, int(self.hparams.ui_layers), reduce="mean")
        return out[: self.n_users], out[self.n_users:] + F.normalize(h, dim=1)

    def representations(self):
        return self.forward_graph(self.item_adj())

    def on_train_epoch_start(self):
        self._rebuild = True

    def batch_loss(self, users, pos, neg):
        if self._rebuild or self._item_adj is None:  # first batch of the epoch: learn the graph
            edges, self._rebuild = self.item_adj(), False
            self._item_adj = tuple(t.detach() for t in edges)
        else:
            edges = self._item_adj
        h_u, h_i = self.forward_graph(edges)
        u, p, n = rows(h_u, users), rows(h_i, pos), rows(h_i, neg)
        reg = 0.5 * (u.square().sum() + p.square().sum() + n.square().sum()) / users.shape[0]
        return bpr_logsigmoid(u, p, n) + self.hparams.reg_weight * reg

    def configure_optimizers(self):
        return with_lr_decay(super().configure_optimizers(), float(self.hparams.lr_decay),
                             float(self.hparams.lr_decay_epochs))
