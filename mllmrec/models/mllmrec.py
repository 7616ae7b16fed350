"""MLLMRec (Dang et al., AAAI; SPEC steps 13-15): two MLP towers over frozen LLM-derived features.

Official code: Yuzhuo-Dang/MLLMRec ``src/models/mllmrec.py`` (inside MMRec). The user tower reads
the encoded preference D^p_u, the item tower the propagated item features E* of the refined
item-item graph (:mod:`mllmrec.item_graph`, built once by the graph stage); ``y_ui = h_u . h_i``,
BPR. The static-shape CUDA-graph step (``model.cuda_graphs``) is in :mod:`.static_step`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mllmrec.models.base import Inputs, OptimizerFactory, RankingModule
from mllmrec.models.layers import bipartite_norm_adj, lightgcn_layers, rows
from mllmrec.models.losses import bpr_logsigmoid
from mllmrec.models.static_step import StaticStep, replayable_adam, resolve_mode


class Tower(nn.Module):
    """h = LeakyReLU(e W1 + b1) W2 + b2.

    ``init="default"`` keeps PyTorch's nn.Linear init, as the official code does (its published
    numbers come from it); ``"xavier"`` (uniform weights, zero biases) is what the paper's text says.
    """

    def __init__(self, d_in: int, d1: int, d: int, init: str = "default"):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d1)
        self.fc2 = nn.Linear(d1, d)
        if init == "xavier":
            for layer in (self.fc1, self.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        elif init != "default":
            raise ValueError(f"model.init must be 'xavier' or 'default', got {init!r}")

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.leaky_relu(self.fc1(e)))


class MLLMRecModule(RankingModule):
    """y_ui = h_u . h_i with h_u = tower_u(e_u) and h_i = tower_i(E*_i).

    The inputs (user preference embeddings, propagated item embeddings E*) are frozen buffers
    computed once by the pipeline. Each training step runs the towers only on the distinct users
    and items of the batch (the same gradients as a full forward, far less work; on a GPU, on the
    batch's rows as drawn, which avoids a sort and a host sync per step).
    ``ui_layers > 0`` ("w/ GCN_UI") adds a LightGCN over the normalised user-item training graph
    on top of the normalised tower outputs (sum of layers); that needs a full forward per step.
    Inputs: ``inputs.user_features`` and ``inputs.item_features`` (arrays or tensors), and
    ``inputs.data.train_matrix`` when ``ui_layers > 0``.
    """

    needs: ClassVar[str] = "features"

    def __init__(
        self,
        inputs: Inputs,
        optimizer: OptimizerFactory | None = None,
        d: int = 64,
        d1: int = 256,
        init: str = "default",
        user_init: str = "preference",
        ui_layers: int = 0,
        cuda_graphs: str | bool = False,
    ):
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["inputs", "optimizer"])
        self.register_buffer("user_feat", torch.as_tensor(inputs.user_features, dtype=torch.float32), persistent=False)
        self.register_buffer("item_feat", torch.as_tensor(inputs.item_features, dtype=torch.float32), persistent=False)
        self.user_tower = Tower(self.user_feat.shape[1], d1, d, init)
        self.item_tower = Tower(self.item_feat.shape[1], d1, d, init)
        self.ui_layers = int(ui_layers)
        if self.ui_layers > 0:
            self.ui_adj = bipartite_norm_adj(inputs.data.train_matrix)
        self._static: StaticStep | None = None  # model.cuda_graphs: the static-shape (captured) step
        self._steps_of: int | None = None  # its batch size when the datamodule hands over whole epochs

    # index_select: ~4x faster than advanced indexing for these row gathers on CPU
    def user_repr(self, users: torch.Tensor | None = None) -> torch.Tensor:
        return self.user_tower(self.user_feat if users is None else self.user_feat.index_select(0, users))

    def item_repr(self, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.item_tower(self.item_feat if items is None else self.item_feat.index_select(0, items))

    def representations(self):
        h_u, h_i = self.user_repr(), self.item_repr()
        if self.ui_layers > 0:
            n_users = h_u.shape[0]
            z = lightgcn_layers(self.ui_adj, F.normalize(torch.cat([h_u, h_i], 0)), self.ui_layers)
            h_u, h_i = h_u + z[:n_users], h_i + z[n_users:]
        return h_u, h_i

    def batch_loss(self, users, pos, neg):
        if self.ui_layers > 0:
            h_u_all, h_i_all = self.representations()
            return bpr_logsigmoid(rows(h_u_all, users), rows(h_i_all, pos), rows(h_i_all, neg))
        items = torch.cat([pos, neg])
        if users.device.type != "cpu":
            # on a GPU the towers over the batch's rows cost less than torch.unique's sort + sync
            h_pos, h_neg = self.item_repr(items).split(users.shape[0])
            return bpr_logsigmoid(self.user_repr(users), h_pos, h_neg)
        uniq_u, inv_u = torch.unique(users, return_inverse=True)
        h_u = rows(self.user_repr(uniq_u), inv_u)
        uniq_i, inv_i = torch.unique(items, return_inverse=True)
        h_pos, h_neg = rows(self.item_repr(uniq_i), inv_i).split(users.shape[0])
        return bpr_logsigmoid(h_u, h_pos, h_neg)

    # ---- model.cuda_graphs: the static-shape training step (mllmrec/static_step.py) ----------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        mode = self.hparams.cuda_graphs
        if self.trainer.world_size > 1 and str(mode).lower() == "auto":  # several processes: the normal step
            mode = False
        use, capture = resolve_mode(mode, self.trainer.strategy.root_device, self.ui_layers)
        self._static = StaticStep(self, capture) if use else None
        self.automatic_optimization = not use  # the step drives Adam itself (manual optimisation)
        dm = self.trainer.datamodule
        self._steps_of = None
        if dm is not None and hasattr(dm, "epoch_as_one_batch"):
            dm.epoch_as_one_batch = use
            self._steps_of = int(dm.batch_size) if use else None

    def distributed_refusal(self, trainer) -> str | None:
        if str(self.hparams.cuda_graphs).lower() == "true":
            return ("model.cuda_graphs=true: the static-shape step drives Adam itself, outside DDP's gradient "
                    "averaging (model.cuda_graphs=false or auto)")
        return None

    def configure_optimizers(self):
        if self._static is None:
            return super().configure_optimizers()
        return replayable_adam(self.optimizer_factory, self.parameters(), capturable=self._static.capture)

    def training_step(self, batch, batch_idx):
        if self._static is None:
            return super().training_step(batch, batch_idx)
        users, pos, neg = batch  # the whole epoch when the datamodule hands it over in one go
        opt, size, total = self.optimizers(), self._steps_of or users.shape[0], 0.0
        for start in range(0, users.shape[0], size):  # one optimizer step (and global step) per batch
            u, p, n = (t[start : start + size] for t in (users, pos, neg))
            total = total + self._static(opt, u, p, n).detach() * u.shape[0]
        loss = total / users.shape[0]  # the mean over rows, as Lightning's batch-size-weighted epoch mean
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=users.shape[0])
        return loss
