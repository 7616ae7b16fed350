"""LightGCN (He et al., SIGIR 2020), the paper's Table 1 baseline, as in MMRec
(enoche/MMRec ``src/models/lightgcn.py``, ``src/configs/model/LightGCN.yaml``): ID embeddings
propagated over the normalised user-item training graph, mean over layers 0..L; Xavier-uniform
init; BPR (MMRec's 1e-10 form) plus ``reg_weight`` x the L2 norm of the layer-0 batch embeddings
divided by the batch size."""

from __future__ import annotations

import torch
from torch import nn

from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.layers import bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import bpr_sigmoid_eps, emb_reg


class LightGCNModule(RankingModule):
    """LightGCN over the user-item graph; regularisation on the layer-0 embeddings."""

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64, layers: int = 2,
                 reg_weight: float = 1e-4):
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        data = inputs.data
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(data.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(data.n_items, d)))
        self.adj = bipartite_norm_adj(data.train_matrix)
        self.n_users = data.n_users

    def representations(self):
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        out = lightgcn_layers(self.adj, ego, int(self.hparams.layers), reduce="mean")
        return out[: self.n_users], out[self.n_users:]

    def batch_loss(self, users, pos, neg):
        h_u, h_i = self.representations()
        u, p, n = rows(h_u, users), rows(h_i, pos), rows(h_i, neg)
        loss = bpr_sigmoid_eps((u * p).sum(1), (u * n).sum(1))
        ego = rows(self.user_emb, users), rows(self.item_emb, pos), rows(self.item_emb, neg)
        return loss + self.hparams.reg_weight * emb_reg(*ego)
