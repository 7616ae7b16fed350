"""SMORE (Ong & Khong, "Spectrum-based Modality Representation Fusion Graph Convolutional Network for
Multimodal Recommendation", WSDM 2025), as in ``src/models/smore.py`` of kennethorq/SMORE at
0148d92da0d7a5e9c2923e368c8d029147f861e6 (byte-identical to enoche/MMRec at e775373, which adds
SMORE in ae629c3), with ``src/configs/model/SMORE.yaml`` and MMRec's ``overall.yaml``.

* Built once: the normalised user-item graph D^-1/2 A D^-1/2 and its user-item block R^ (lifts item
  views to users); per modality m, the similarity-weighted cosine top-``<m>_knn_k`` graph of the raw
  features (the item itself included), D^-1/2 S D^-1/2 with D the row sums; the fusion graph = the
  max-pool of the modality graphs over the UNION of their edges (an edge absent from one graph is
  missing, not 0; not renormalised).
* Spectral filters: x_m = W_m f_m + b (f_m the raw feature table, a trainable parameter),
  c_m = irfft(rfft(x_m) * w_m) ('ortho' FFTs over the d features, w_m a learned complex filter);
  fusion c_f = irfft(rfft(x_text) * rfft(x_image) * w_f) (the PRODUCT of the spectra).
* Views: h_v = A_v^L (e_item * sigmoid(gate_v(c_v))) for v in (image, text, fusion), users R^ h_v;
  behaviour view = LightGCN (mean over layers 0..L_ui) of the ID embeddings.
* Modality-aware preference: a_m = softmax over the d FEATURES of query_m(fusion view);
  side = mean(p_image * a_image * V_image, p_text * a_text * V_text, p_fusion * V_fusion), p_v =
  dropout(sigmoid(gate(content))); final = content + side; y_ui = e_u . e_i.
* Loss: -mean log sigmoid(y_ui - y_uj) + reg_weight x 1/2 (|u|^2 + |i|^2 + |j|^2) / ``batch_size`` (the
  CONFIGURED batch size, also for the last smaller batch, on the final embeddings) + cl_weight x
  (InfoNCE(side, content) of the batch's positive items + of its users, tau 0.2 (a literal in the
  official code: the yaml's ``temperature`` is never read), cosine, in-batch negatives from
  ``content``, repeated rows included); Adam, lr x 0.96^(epoch/50).
* ``refine=True`` (``graph.refine=true``): each modality graph is the paper's refined graph on the
  same top-k candidates (:func:`mllmrec.models.knn_graphs.model_item_graph`); the fusion graph is the
  max-pool of the refined graphs. Nothing else changes.

Deviations (all without effect on the equations unless said):
* ONE modality (office: text only; the official code crashes there): the missing view is left out
  (projection, filter, gate, graph, query, preference gate), the fusion spectrum is the product over
  the present spectra (text: rfft(x_t) * w_f), the fusion graph the max-pool over the present graph
  (the text graph), and side = mean of the 2 views. With both modalities it is the official model.
  The patched official run used the same form; one log line says so at build time.
* Evaluation computes the representations once per evaluation (official: once per 4096 users; same
  numbers); the kNN graphs are built at each run, sparse and chunked (official: a dense |I| x |I|
  cosine, cached by k only); a tie in a top-k goes to the smaller item id with the item itself first;
  the user-item degrees get +1e-7 (:func:`bipartite_norm_adj`; official: inf -> 0; relative 1e-7).
* InfoNCE as a log-sum-exp over the batch's distinct rows weighted by their multiplicities
  (:func:`info_nce_over_rows`: the same value and gradient as the official exp / sum over all B rows).
* Negatives come from the platform's sampler (every item; official: the items seen in training).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mllmrec.errors import ConfigError
from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule, with_lr_decay
from mllmrec.models.knn_graphs import model_item_graph, refine_settings
from mllmrec.models.layers import EdgeGraph, bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import bpr_logsigmoid, info_nce_over_rows
from mllmrec.models.modalities import require_modalities

log = logging.getLogger(__name__)

MODALITY_ORDER = ("image", "text")  # the official order of the views (image, text, fusion)


def max_pool_fusion(graphs: list[sp.spmatrix]) -> sp.csr_matrix:
    """SMORE's ``max_pool_fusion``: on the union of the graphs' stored edges, the largest value among
    the graphs that have the edge (absent = missing, not 0: ``A.maximum(B)`` would differ where a value
    is negative). Not renormalised. One graph: itself."""
    coos = [sp.coo_matrix(g, dtype=np.float32) for g in graphs]
    r = np.concatenate([c.row for c in coos]).astype(np.int64)
    c = np.concatenate([c.col for c in coos]).astype(np.int64)
    v = np.concatenate([c.data for c in coos])
    if v.size == 0:
        return sp.csr_matrix(graphs[0].shape, dtype=np.float32)
    order = np.lexsort((c, r))
    r, c, v = r[order], c[order], v[order]
    first = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (c[1:] != c[:-1])])
    return sp.csr_matrix((np.maximum.reduceat(v, first), (r[first], c[first])), shape=graphs[0].shape)


def gated_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.Sigmoid())


def query_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d, bias=False))


class SMOREModule(RankingModule):
    """``batch_size``: the configured training batch size (``${data.batch_size}``), the divisor of the
    regulariser as in the official code."""

    needs: ClassVar[str] = "modalities"

    def __init__(self, inputs: Inputs, optimizer: OptimizerFactory | None = None, d: int = 64,
                 ui_layers: int = 3, item_layers: int = 1, image_knn_k: int = 10, text_knn_k: int = 10,
                 reg_weight: float = 1e-5, dropout: float = 0.0, cl_weight: float = 0.01, tau: float = 0.2,
                 batch_size: int = 2048, lr_decay: float = 0.96, lr_decay_epochs: int = 50,
                 refine: bool = False, alpha: float = 0.7, k_c: int = 10, denoise: bool = True, enhance: bool = True):
        super().__init__(optimizer)
        modalities, n_users, n_items = inputs.modalities, inputs.data.n_users, inputs.data.n_items
        require_modalities(modalities, "SMORE")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {dropout}")
        if int(batch_size) < 1:
            raise ConfigError("model.batch_size", f"must be >= 1, got {batch_size}")
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.refine = refine_settings(refine, alpha, k_c, denoise, enhance)
        self.n_users, self.n_items = n_users, n_items
        self.modalities = [m for m in MODALITY_ORDER if m in modalities]
        views = [*self.modalities, "fusion"]
        if len(self.modalities) == 1:
            log.info("SMORE: one modality (%s): no %s view; the fusion view filters the %s spectrum (x the fusion "
                     "filter) on the %s graph; side = mean of 2 views", self.modalities[0],
                     "image" if self.modalities[0] == "text" else "text", *self.modalities * 2)
        train = sp.csr_matrix(inputs.data.train_matrix, dtype=np.float32)
        self.norm_adj = bipartite_norm_adj(train)
        self.r_hat = EdgeGraph(self.norm_adj.csr[:n_users, n_users:])  # R^ = D_u^-1/2 R D_i^-1/2
        knn = {"image": image_knn_k, "text": text_knn_k}
        graphs = {m: model_item_graph(modalities[m], int(knn[m]), train, self.refine, weighted=True)
                  for m in self.modalities}
        graphs["fusion"] = max_pool_fusion(list(graphs.values()))
        self.item_graph = nn.ModuleDict({v: EdgeGraph(g) for v, g in graphs.items()})
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.feat = nn.ParameterDict({m: nn.Parameter(torch.from_numpy(modalities[m].copy())) for m in self.modalities})
        self.trs = nn.ModuleDict({m: nn.Linear(modalities[m].shape[1], d) for m in self.modalities})
        self.query = nn.ModuleDict({m: query_mlp(d) for m in self.modalities})
        self.gate = nn.ModuleDict({v: gated_mlp(d) for v in views})  # gate_v, gate_t, gate_f
        self.prefer = nn.ModuleDict({v: gated_mlp(d) for v in views})  # gate_{image,text,fusion}_prefer
        self.spectral = nn.ParameterDict({v: nn.Parameter(torch.randn(1, d // 2 + 1, 2)) for v in views})
        self.dropout = nn.Dropout(dropout)

    def filtered(self) -> dict[str, torch.Tensor]:
        """The spectral filters' outputs c_v [n_items, d] per view (uni-modal and fusion)."""
        d = int(self.hparams.d)
        spectra = {m: torch.fft.rfft(self.trs[m](self.feat[m]), dim=1, norm="ortho") for m in self.modalities}
        out = {m: torch.fft.irfft(spectra[m] * torch.view_as_complex(self.spectral[m]), n=d, dim=1, norm="ortho")
               for m in self.modalities}
        fused = spectra[self.modalities[-1]]  # text (or the one modality) first, as the official product
        for m in self.modalities[:-1]:
            fused = fused * spectra[m]
        out["fusion"] = torch.fft.irfft(fused * torch.view_as_complex(self.spectral["fusion"]), n=d, dim=1, norm="ortho")
        return out

    def item_views(self) -> dict[str, torch.Tensor]:
        """[users; items] x d per view: gated ID embeddings over the view's item graph, lifted by R^."""
        views = {}
        for v, c in self.filtered().items():
            h = self.item_emb * self.gate[v](c)
            for _ in range(int(self.hparams.item_layers)):
                h = self.item_graph[v](h)
            views[v] = torch.cat([self.r_hat(h), h], 0)
        return views

    def embed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final, side, content), each [(users + items), d]."""
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        content = lightgcn_layers(self.norm_adj, ego, int(self.hparams.ui_layers), reduce="mean")
        views = self.item_views()
        fusion = views["fusion"]
        parts = [self.dropout(self.prefer[m](content)) * (torch.softmax(self.query[m](fusion), dim=-1) * views[m])
                 for m in self.modalities]
        parts.append(self.dropout(self.prefer["fusion"](content)) * fusion)
        side = torch.stack(parts).mean(0)
        return content + side, side, content

    def representations(self):
        final, _, _ = self.embed()
        return final[: self.n_users], final[self.n_users:]

    def batch_loss(self, users, pos, neg):
        final, side, content = self.embed()
        pos, neg = pos + self.n_users, neg + self.n_users  # item rows of the (users + items) tables
        u, p, n = rows(final, users), rows(final, pos), rows(final, neg)
        reg = 0.5 * (u.square().sum() + p.square().sum() + n.square().sum()) / int(self.hparams.batch_size)
        tau = float(self.hparams.tau)
        cl = info_nce_over_rows(side, content, pos, tau) + info_nce_over_rows(side, content, users, tau)
        return bpr_logsigmoid(u, p, n) + self.hparams.reg_weight * reg + self.hparams.cl_weight * cl

    def configure_optimizers(self):
        return with_lr_decay(super().configure_optimizers(), float(self.hparams.lr_decay),
                             float(self.hparams.lr_decay_epochs))
