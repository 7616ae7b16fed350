"""ID-embedding baselines from the paper's Table 1, on the same data module, metrics and early
stopping as MLLMRec: BPR-MF and LightGCN, as in the MMRec framework (64-d embeddings, BPR loss
plus ``reg_weight`` x the L2 norm of the batch embeddings divided by the batch size)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mllmrec.model import OptimizerFactory, RankingModule, bipartite_norm_adj, lightgcn_layers, rows

if TYPE_CHECKING:
    from mllmrec.pipeline import Inputs


def emb_reg(*embeddings: torch.Tensor) -> torch.Tensor:
    """MMRec's EmbLoss: sum of the L2 norms of the batch embeddings / batch size."""
    return sum(torch.linalg.vector_norm(e) for e in embeddings) / embeddings[-1].shape[0]


def mmrec_bpr(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean()


class BPRModule(RankingModule):
    """Matrix factorisation trained with BPR (Rendle et al. 2009); Xavier-normal init."""

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 reg_weight: float = 1e-4):
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.user_emb = nn.Embedding(inputs.data.n_users, d)
        self.item_emb = nn.Embedding(inputs.data.n_items, d)
        nn.init.xavier_normal_(self.user_emb.weight)
        nn.init.xavier_normal_(self.item_emb.weight)

    def representations(self):
        return self.user_emb.weight, self.item_emb.weight

    def batch_loss(self, users, pos, neg):
        u, p, n = self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
        loss = mmrec_bpr((u * p).sum(1), (u * n).sum(1))
        return loss + self.hparams.reg_weight * emb_reg(u, p, n)


class LightGCNModule(RankingModule):
    """LightGCN (He et al. 2020): ID embeddings propagated over the normalised user-item graph,
    mean over layers 0..L; Xavier-uniform init; regularisation on the layer-0 embeddings."""

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
        loss = mmrec_bpr((u * p).sum(1), (u * n).sum(1))
        ego = rows(self.user_emb, users), rows(self.item_emb, pos), rows(self.item_emb, neg)
        return loss + self.hparams.reg_weight * emb_reg(*ego)
