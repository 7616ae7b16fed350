"""BPR-MF (Rendle et al., UAI 2009), the paper's Table 1 baseline, as in MMRec
(enoche/MMRec ``src/models/bpr.py``, ``src/configs/model/BPR.yaml``): 64-d ID embeddings with
Xavier-normal init, BPR loss (MMRec's 1e-10 form) plus ``reg_weight`` x the L2 norm of the batch
embeddings divided by the batch size."""

from __future__ import annotations

from torch import nn

from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.losses import bpr_sigmoid_eps, emb_reg


class BPRModule(RankingModule):
    """Matrix factorisation trained with BPR; Xavier-normal init."""

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
        loss = bpr_sigmoid_eps((u * p).sum(1), (u * n).sum(1))
        return loss + self.hparams.reg_weight * emb_reg(u, p, n)
