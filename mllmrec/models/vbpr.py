"""VBPR (He & McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback",
AAAI 2016), as in MMRec's ``src/models/vbpr.py``.

Item representation: ``[ID embedding (d) ; W f_i + b (d)]`` with f_i the item's modality features
(text and image concatenated when both exist); user embedding of size 2d; y_ui = u . i; BPR loss
plus ``reg_weight`` x MMRec's EmbLoss over the batch rows.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.layers import rows
from mllmrec.models.losses import bpr_sigmoid_eps, emb_reg
from mllmrec.models.modalities import require_modalities


def concat_modalities(modalities: dict[str, np.ndarray]) -> torch.Tensor:
    """Text then image features side by side (MMRec's order)."""
    return torch.from_numpy(np.concatenate([modalities[m] for m in modalities], axis=1).astype(np.float32))


class VBPRModule(RankingModule):
    needs: ClassVar[str] = "modalities"

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 reg_weight: float = 1e-4):
        super().__init__(optimizer)
        require_modalities(inputs.modalities, "VBPR")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.register_buffer("item_feat", concat_modalities(inputs.modalities), persistent=False)
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.data.n_users, 2 * d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.data.n_items, d)))
        self.item_linear = nn.Linear(self.item_feat.shape[1], d)
        nn.init.xavier_normal_(self.item_linear.weight)  # MMRec's xavier_normal_initialization
        nn.init.zeros_(self.item_linear.bias)

    def item_repr(self, items: torch.Tensor | None = None) -> torch.Tensor:
        if items is None:
            return torch.cat([self.item_emb, self.item_linear(self.item_feat)], 1)
        return torch.cat([rows(self.item_emb, items), self.item_linear(self.item_feat.index_select(0, items))], 1)

    def representations(self):
        return self.user_emb, self.item_repr()

    def batch_loss(self, users, pos, neg):
        u = rows(self.user_emb, users)
        p, n = self.item_repr(torch.cat([pos, neg])).split(users.shape[0])
        loss = bpr_sigmoid_eps((u * p).sum(1), (u * n).sum(1))
        return loss + self.hparams.reg_weight * emb_reg(u, p, n)
