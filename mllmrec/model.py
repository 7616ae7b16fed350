"""LightningModule for MLLMRec (SPEC steps 13-15): two MLP towers over frozen text features, BPR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytorch_lightning as pl
from torch import nn

from mllmrec.metrics import METRICS, evaluate_batch


class Tower(nn.Module):
    """h = LeakyReLU(e W1 + b1) W2 + b2."""

    def __init__(self, d_in: int, d1: int, d: int, init: str = "xavier"):
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


def bpr_loss(h_u: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(y_ui - y_uj)."""
    return -F.logsigmoid((h_u * h_pos).sum(1) - (h_u * h_neg).sum(1)).mean()


class MLLMRecModule(pl.LightningModule):
    """Scores y_ui = h_u . h_i with h_u = tower_u(e_u) and h_i = tower_i(E*_i).

    The inputs (user preference embeddings, propagated item embeddings E*) are frozen buffers,
    computed once by the pipeline. Each training step runs the towers only on the distinct users
    and items of the batch (identical gradients to a full forward, far less work).
    """

    def __init__(
        self,
        user_features: torch.Tensor,
        item_features: torch.Tensor,
        d: int = 64,
        d1: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        init: str = "xavier",
        user_init: str = "preference",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["user_features", "item_features"])
        self.register_buffer("user_feat", torch.as_tensor(user_features, dtype=torch.float32), persistent=False)
        self.register_buffer("item_feat", torch.as_tensor(item_features, dtype=torch.float32), persistent=False)
        self.user_tower = Tower(self.user_feat.shape[1], d1, d, init)
        self.item_tower = Tower(self.item_feat.shape[1], d1, d, init)
        self.best = {"epoch": -1, "val/recall@20": -1.0}
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._h_items: torch.Tensor | None = None

    # ---- representations -------------------------------------------------------------
    def user_repr(self, users: torch.Tensor | None = None) -> torch.Tensor:
        return self.user_tower(self.user_feat if users is None else self.user_feat[users])

    def item_repr(self, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.item_tower(self.item_feat if items is None else self.item_feat[items])

    def score_users(self, users: torch.Tensor, h_items: torch.Tensor | None = None) -> torch.Tensor:
        """Full-ranking scores [len(users), n_items]."""
        h_items = self.item_repr() if h_items is None else h_items
        return self.user_repr(users) @ h_items.T

    # ---- training --------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        users, pos, neg = batch
        uniq_u, inv_u = torch.unique(users, return_inverse=True)
        h_u = self.user_repr(uniq_u)[inv_u]
        uniq_i, inv_i = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        h_pos, h_neg = self.item_repr(uniq_i)[inv_i].split(users.shape[0])
        loss = bpr_loss(h_u, h_pos, h_neg)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=users.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )

    # ---- evaluation ------------------------------------------------------------------
    def _eval_start(self):
        self._sums = {m: torch.zeros((), dtype=torch.float64, device=self.device) for m in METRICS}
        self._count = 0
        self._h_items = self.item_repr()

    def _eval_step(self, batch):
        scores = self.score_users(batch["users"], self._h_items)
        for m, v in evaluate_batch(scores, batch).items():
            self._sums[m] += v.sum()
        self._count += int(batch["users"].shape[0])

    def _eval_end(self, prefix: str) -> dict[str, float]:
        values = {f"{prefix}/{m}": (self._sums[m] / max(self._count, 1)).float() for m in METRICS}
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith("recall@20"))
        self._h_items = None
        return {k: float(v) for k, v in values.items()}

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        values = self._eval_end("val")
        if not self.trainer.sanity_checking and values["val/recall@20"] > self.best["val/recall@20"]:
            self.best = {"epoch": int(self.current_epoch), **values}

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    # keep the best-epoch record across checkpoint save/restore (resume)
    def on_save_checkpoint(self, checkpoint):
        checkpoint["mllmrec_best"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint):
        self.best = dict(checkpoint.get("mllmrec_best", self.best))
