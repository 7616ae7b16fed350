"""LGMRec (Guo et al., "LGMRec: Local and Global Graph Learning for Multimodal Recommendation",
AAAI 2024), as in MMRec's ``src/models/lgmrec.py``.

* Local graph embeddings: CGE = LightGCN (mean over layers 0..L_ui) of the ID embeddings over the
  normalised user-item graph; per modality m, MGE_m = A^{L_mm} [R_mean f_m W_m ; f_m W_m] (item
  features projected, users the mean of their items, propagated L_mm times over the same graph).
* Global hypergraph embeddings: per modality, item-hyperedge memberships
  H_i = softmax_gumbel(f_m V_m / tau), user memberships H_u = softmax_gumbel(R f_m V_m / tau), both
  with dropout (1 - keep_rate); lat = H_i^T CGE_items, GHE_m = [H_u lat ; H_i lat] (n_hyper_layer
  rounds).
* ``e = CGE + sum_m norm(MGE_m) + alpha norm(sum_m GHE_m)``; y_ui = e_u . e_i.
* Loss: BPR + ``cl_weight`` x HCL + ``reg_weight`` x (|u| + |i| + |j|) / B, with HCL the InfoNCE
  (tau = 0.2) between the two modalities' hypergraph embeddings of the batch's users and positive
  items.

Differences from MMRec's code, all where it is undefined or random: with ONE modality (office, text
only) there is no cross-modal pair, so the HCL term is 0 (MMRec's code fails there); evaluation
uses the noiseless softmax memberships (MMRec draws Gumbel noise at test time too).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.layers import EdgeGraph, bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import bpr_logsigmoid
from mllmrec.models.modalities import require_modalities

TAU = 0.2


def info_nce(a: torch.Tensor, b: torch.Tensor, all_b: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """-sum_r log( exp(cos(a_r, b_r)/tau) / sum_j exp(cos(a_r, all_b_j)/tau) )  (MMRec's ssl_triple_loss)."""
    a, b, all_b = F.normalize(a), F.normalize(b), F.normalize(all_b)
    return -((a * b).sum(1) / tau - torch.logsumexp(a @ all_b.T / tau, dim=1)).sum()


class LGMRecModule(RankingModule):
    needs: ClassVar[str] = "modalities"

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 ui_layers: int = 2, mm_layers: int = 2, hyper_layers: int = 1, hyper_num: int = 4,
                 keep_rate: float = 0.5, alpha: float = 0.3, cl_weight: float = 1e-4, reg_weight: float = 1e-6):
        super().__init__(optimizer)
        modalities, n_users, n_items = inputs.modalities, inputs.data.n_users, inputs.data.n_items
        require_modalities(modalities, "LGMRec")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.n_users, self.n_items = n_users, n_items
        train = sp.csr_matrix(inputs.data.train_matrix, dtype=np.float32)
        self.norm_adj = bipartite_norm_adj(train)
        self.r_sum = EdgeGraph(train)  # R @ x (users x items)
        deg = np.asarray(train.sum(1)).ravel() + 1e-7
        self.r_mean = EdgeGraph(sp.diags(1.0 / deg) @ train)
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        for m, f in modalities.items():
            self.register_buffer(f"feat_{m}", torch.from_numpy(f.copy()), persistent=False)
        self.modalities = list(modalities)
        self.trs = nn.ParameterDict({m: nn.Parameter(nn.init.xavier_uniform_(torch.empty(f.shape[1], d)))
                                     for m, f in modalities.items()})
        self.hyper = nn.ParameterDict({m: nn.Parameter(nn.init.xavier_uniform_(torch.empty(f.shape[1], hyper_num)))
                                       for m, f in modalities.items()})
        self.drop = nn.Dropout(p=1.0 - keep_rate)

    def feat(self, m: str) -> torch.Tensor:
        return getattr(self, f"feat_{m}")

    def memberships(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft hyperedge memberships: Gumbel-softmax in training, plain softmax in evaluation."""
        if self.training:
            return F.gumbel_softmax(logits, TAU, dim=1, hard=False)
        return torch.softmax(logits / TAU, dim=1)

    def cge(self) -> torch.Tensor:
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        return lightgcn_layers(self.norm_adj, ego, int(self.hparams.ui_layers), reduce="mean")

    def mge(self, m: str) -> torch.Tensor:
        items = self.feat(m) @ self.trs[m]
        out = torch.cat([self.r_mean(items), items], 0)
        for _ in range(int(self.hparams.mm_layers)):
            out = self.norm_adj(out)
        return out

    def ghe(self, m: str, cge_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i_logits = self.feat(m) @ self.hyper[m]
        h_i = self.drop(self.memberships(i_logits))
        h_u = self.drop(self.memberships(self.r_sum(i_logits)))
        i_ret, u_ret = cge_items, None
        for _ in range(int(self.hparams.hyper_layers)):
            lat = h_i.T @ i_ret
            i_ret, u_ret = h_i @ lat, h_u @ lat
        return u_ret, i_ret

    def embed(self):
        cge = self.cge()
        local = cge + sum(F.normalize(self.mge(m)) for m in self.modalities)
        hyper = {m: self.ghe(m, cge[self.n_users:]) for m in self.modalities}
        ghe = sum(torch.cat(hyper[m], 0) for m in self.modalities)
        out = local + self.hparams.alpha * F.normalize(ghe)
        return out[: self.n_users], out[self.n_users:], hyper

    def representations(self):
        h_u, h_i, _ = self.embed()
        return h_u, h_i

    def batch_loss(self, users, pos, neg):
        h_u, h_i, hyper = self.embed()
        u, p, n = rows(h_u, users), rows(h_i, pos), rows(h_i, neg)
        reg = (torch.linalg.vector_norm(u) + torch.linalg.vector_norm(p) + torch.linalg.vector_norm(n)) / n.shape[0]
        loss = bpr_logsigmoid(u, p, n) + self.hparams.reg_weight * reg
        if len(self.modalities) >= 2:  # cross-modal hypergraph contrast (the first two modalities)
            (u_a, i_a), (u_b, i_b) = hyper[self.modalities[1]], hyper[self.modalities[0]]  # image vs text
            hcl = info_nce(rows(u_a, users), rows(u_b, users), u_b) + info_nce(rows(i_a, pos), rows(i_b, pos), i_b)
            loss = loss + self.hparams.cl_weight * hcl
        return loss
