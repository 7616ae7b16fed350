"""SLMRec (Tao et al., "Self-supervised Learning for Multimedia Recommendation", IEEE TMM 2023), as in
MMRec's port ``src/models/slmrec.py`` and ``src/configs/model/SLMRec.yaml`` (enoche/MMRec at
e775373b3ab1354a92165b0885ce4ab3dc4d7497; the SLMRec files are unchanged since a75d89a), the port the
Amazon numbers come from. The author's code (zltao/SLMRec at 0c05a1d, ``models/SLMRec.py``) was read for
what the port changed (audio removed, ``+1e-8`` in the degree).

* Three LightGCN views over the normalised user-item graph D^-1/2 A D^-1/2, each the mean of layers
  0..L: ID ``[E_u ; E_i]``, visual ``[E_u ; W_v n(f_v) + b_v]``, text ``[E_u ; W_t n(f_t) + b_t]`` (the
  SAME user table starts every view; n = row L2 normalisation of the frozen features).
* Fusion (``mm_fusion_mode: concat``): ``user = Lin_u([i_u, v_u, t_u])``, ``item = Lin_i([i_i, v_i, t_i])``;
  ``y_ui = user . item``, the unnormalised dot product (MMRec ranks by its sigmoid).
* Loss = in-batch InfoNCE of cos(user, positive) / ``temp`` (users as rows, duplicates not masked; no
  BPR: the batch's negative is unused) + ``ssl_alpha`` x FAC. FAC on the batch's positive items, on
  the per-view item outputs, unnormalised logits / ``ssl_temp``:
  ``x = g_i_iv(i)``: CE(x g_v_iv(v)^T) [64-d], then ``g_iva_ivat(g_iv_iva(x))`` vs ``g_t_ivat(t)`` [d/2].
* The only regulariser is Adam's weight decay 1e-4 (``conf/model/slmrec.yaml``'s optimizer node).

Deviations from the port, and why:

* One LightGCN pass on the column-concatenated views ``[[E_u, E_u, E_u], [E_i, V, T]]`` instead of
  three passes (the same sums per column; one sparse product per layer instead of three); the fusion Linear
  is applied to the batch's rows only in training. +1e-7 in the degree (the house ``bipartite_norm_adj``) for 1e-8.
* Evaluation scores the current weights (``representations()``); MMRec reuses the embeddings cached by
  the epoch's last training batch, i.e. the weights one Adam step before.
* One modality (office: text only; the port fails without ``image_feat.npy``): fusion over
  [ID, that modality]; FAC keeps that modality's term as the two-modality code computes it (text: the
  chain g_i_iv -> g_iv_iva -> g_iva_ivat vs g_t_ivat), the same form as the patched official run. One
  log line says so.
* Heads that receive no gradient are not registered (``g_a_iva`` never; ``g_v_iv`` without the image
  modality, ``g_iv_iva``/``g_iva_ivat``/``g_t_ivat`` without text), but they are still drawn in MMRec's
  order, so with the same torch seed the starting weights equal MMRec's (its parameter count includes
  them: 530,752 on office, 522,432 here).
* ``graph.refine=true`` is refused (SLMRec has no item-item graph; it is not a Figure 3 model).

Checked against MMRec's own code on office (seed 999): every starting weight equal, the loss of one
2048-row batch 8.3997555 vs 8.3997564 and the gradients within 3e-8.
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
from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.layers import bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import in_batch_info_nce
from mllmrec.models.modalities import require_modalities

log = logging.getLogger(__name__)

VIEW_ORDER = ("image", "text")  # MMRec's v, t: the order of the dense layers, the views and the fusion
FAC_HEADS = ("i_iv", "v_iv", "iv_iva", "a_iva", "iva_ivat", "t_ivat")  # MMRec's creation order


def fac_heads_used(views: list[str]) -> set[str]:
    """The FAC heads the loss uses with these modalities (``g_a_iva``, the author's audio level, never)."""
    used = {"i_iv"}
    if "image" in views:
        used.add("v_iv")
    if "text" in views:
        used |= {"iv_iva", "iva_ivat", "t_ivat"}
    return used


def xavier_linear(d_in: int, d_out: int) -> nn.Linear:
    """MMRec's layer: PyTorch's default Linear init (bias kept), then xavier_uniform_ on the weight."""
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    return layer


def single_modality_note(views: list[str]) -> str | None:
    if views == ["text"]:
        return ("SLMRec: no image modality: fusion uses [ID, text]; FAC keeps only its ID->text term "
                "(g_i_iv->g_iv_iva->g_iva_ivat vs g_t_ivat); the ID<->visual term is left out")
    if views == ["image"]:
        return "SLMRec: no text modality: fusion uses [ID, image]; FAC keeps only its ID<->visual term"
    return None


class SLMRecModule(RankingModule):
    needs: ClassVar[str] = "modalities"

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64, layers: int = 3,
                 temp: float = 0.2, ssl_temp: float = 0.2, ssl_alpha: float = 0.1, graph_refine: bool = False):
        super().__init__(optimizer)
        if graph_refine:
            raise ConfigError("graph.refine", "SLMRec has no item-item graph to refine (no Figure 3 variant); "
                                              "drop graph.refine=true")
        modalities, n_users, n_items = inputs.modalities, inputs.data.n_users, inputs.data.n_items
        require_modalities(modalities, "SLMRec")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.n_users, self.n_items, self.d = n_users, n_items, d
        self.views = [m for m in VIEW_ORDER if m in modalities]
        if note := single_modality_note(self.views):
            log.warning(note)
        self._build_weights(modalities, n_users, n_items, d)
        self.adj = bipartite_norm_adj(sp.csr_matrix(inputs.data.train_matrix, dtype=np.float32))

    def _build_weights(self, modalities: dict, n_users: int, n_items: int, d: int) -> None:
        """Every weight, drawn from torch's generator in MMRec's order (notes: ``create_u_embeding_i``,
        then the FAC heads), so that the same seed gives MMRec's starting weights."""
        user, item = torch.empty(n_users, d).normal_(), torch.empty(n_items, d).normal_()  # nn.Embedding
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(user))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(item))
        self.dense = nn.ModuleDict()
        for m in self.views:
            self.register_buffer(f"feat_{m}", F.normalize(torch.from_numpy(modalities[m].copy()), dim=1),
                                 persistent=False)
            self.dense[m] = xavier_linear(modalities[m].shape[1], d)
        width = d * (len(self.views) + 1)
        self.item_fuse, self.user_fuse = nn.Linear(width, d), nn.Linear(width, d)
        nn.init.xavier_uniform_(self.item_fuse.weight)
        nn.init.xavier_uniform_(self.user_fuse.weight)
        dims = {"iva_ivat": (d, d // 2), "t_ivat": (d, d // 2)}
        heads = {name: nn.Linear(*dims.get(name, (d, d))) for name in FAC_HEADS}
        for head in heads.values():
            nn.init.xavier_uniform_(head.weight)
        used = fac_heads_used(self.views)
        self.fac = nn.ModuleDict({name: head for name, head in heads.items() if name in used})

    def feat(self, m: str) -> torch.Tensor:
        return getattr(self, f"feat_{m}")

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users [U, (M+1)d], items [I, (M+1)d]): the LightGCN outputs of the views side by side, ID first."""
        items = torch.cat([self.item_emb, *(self.dense[m](self.feat(m)) for m in self.views)], 1)
        users = self.user_emb.repeat(1, len(self.views) + 1)
        out = lightgcn_layers(self.adj, torch.cat([users, items]), int(self.hparams.layers), reduce="mean")
        return out[: self.n_users], out[self.n_users:]

    def representations(self):
        views_u, views_i = self.propagate()
        return self.user_fuse(views_u), self.item_fuse(views_i)

    def fac_loss(self, item_views: torch.Tensor) -> torch.Tensor:
        """FAC on the batch's positive items' per-view outputs (columns: ID, then the modalities)."""
        parts = dict(zip(["id", *self.views], item_views.split(self.d, dim=1)))
        x_i_iv = self.fac["i_iv"](parts["id"])
        loss = item_views.new_zeros(())
        t = float(self.hparams.ssl_temp)
        if "image" in parts:
            loss = loss + in_batch_info_nce(x_i_iv, self.fac["v_iv"](parts["image"]), t, normalize=False)
        if "text" in parts:
            x_iva_ivat = self.fac["iva_ivat"](self.fac["iv_iva"](x_i_iv))
            loss = loss + in_batch_info_nce(x_iva_ivat, self.fac["t_ivat"](parts["text"]), t, normalize=False)
        return loss

    def batch_loss(self, users, pos, neg):
        """InfoNCE(user, positive) + ssl_alpha x FAC(positives); ``neg`` is unused, as in MMRec."""
        views_u, views_i = self.propagate()
        pos_views = rows(views_i, pos)
        u, p = self.user_fuse(rows(views_u, users)), self.item_fuse(pos_views)
        main = in_batch_info_nce(u, p, float(self.hparams.temp))
        return main + self.hparams.ssl_alpha * self.fac_loss(pos_views)
