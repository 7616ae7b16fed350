"""What every model of the zoo shares: the :class:`Inputs` it receives and :class:`RankingModule`,
the ranking base (BPR-style training step, the optimizer from config, full-ranking validation and
test with prebuilt batches, the best-epoch record).

Every model scores y_ui = h_u . h_i. Built from config (``conf/model/<name>.yaml``,
:func:`mllmrec.pipeline.build_model`), a model is ``mllmrec.models.<name>.<Class>`` and takes
``(inputs, optimizer, **its yaml's keys)``: ``inputs`` is an :class:`Inputs` (dataset + prepared
features), of which the class's ``needs`` names what the pipeline must prepare (``"ids"``:
interactions only, ``"features"``: reason -> encode -> graph user/item features, ``"modalities"``:
item modality features); ``optimizer`` is a factory called with the parameters, the composed
``conf/optimizer/adam.yaml`` (``{_target_: torch.optim.Adam, _partial_: true, lr: ...}``; :func:`adam`
in code). Settings from other groups come by interpolation (FREEDOM's ``refine: ${graph.refine}``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch

from mllmrec.cache import Artifact
from mllmrec.data import RecData
from mllmrec.evaluation import RankingEvaluation

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass
class Inputs:
    """What a model is built from: the data and the features its ``needs`` asked the pipeline for."""

    data: RecData
    user_features: np.ndarray | None = None
    item_features: np.ndarray | None = None  # E*, the propagated item features
    modalities: dict[str, np.ndarray] | None = None  # raw item modality features (multimodal baselines)
    artifacts: dict[str, Artifact] = field(default_factory=dict)


def adam(lr: float = 1e-3, weight_decay: float = 0.0, fused: bool = True) -> OptimizerFactory:
    """Adam as ``conf/model/*.yaml`` configures it, as a factory of the parameters."""
    return functools.partial(torch.optim.Adam, lr=lr, weight_decay=weight_decay, fused=fused)




def with_lr_decay(optimizer: torch.optim.Optimizer, decay: float, every: float) -> dict:
    """MMRec's ``learning_rate_scheduler: [decay, every]``: lr x decay^(epoch / every), stepped per epoch
    (LATTICE, SMORE, GUME, ...), as ``configure_optimizers`` returns it."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: decay ** (epoch / every))
    return {"optimizer": optimizer, "lr_scheduler": sched}


class RankingModule(RankingEvaluation, pl.LightningModule):
    """Shared BPR training loop pieces and full-ranking evaluation (:mod:`mllmrec.evaluation`).

    ``optimizer``: a factory of the parameters (see the module doc); None: :func:`adam`'s default.
    """

    needs: ClassVar[str] = "ids"  # the inputs the pipeline prepares: "ids" | "features" | "modalities"
    # several processes (mllmrec/distributed.py): True for a model that leaves some parameters without
    # gradient in some steps (DDP then needs find_unused_parameters=True, which costs a graph traversal)
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, optimizer: OptimizerFactory | None = None):
        super().__init__()
        self.optimizer_factory = optimizer or adam()
        self.best: dict = {"epoch": -1}  # the validation metrics of the best epoch by eval_spec.select

    # subclasses implement these two
    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def representations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (h_users [n_users, d], h_items [n_items, d])."""
        raise NotImplementedError

    def unreached_parameters(self) -> set[str]:
        """Names (as ``named_parameters``) of the trainable parameters that the training loss does not
        reach in this configuration: they get no gradient. Declared, never silently skipped:
        ``tests/test_gradients.py`` checks that these get none and every other one does."""
        return set()

    def training_step(self, batch, batch_idx):
        users, pos, neg = batch
        loss = self.batch_loss(users, pos, neg)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=users.shape[0],
                 sync_dist=self.trainer.world_size > 1)  # several processes: the mean of the ranks' equal shares
        return loss

    def distributed_refusal(self, trainer: pl.Trainer) -> str | None:
        """Why this model cannot train on several processes (one line), or None when it can
        (mllmrec/distributed.py; checked before training)."""
        return None

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    # ---- evaluation: Lightning's hooks over the public entry (mllmrec/evaluation.py) ------------
    def on_validation_epoch_start(self):
        self.begin_evaluation()

    def validation_step(self, batch, batch_idx):
        self.evaluation_step(batch)

    def on_validation_epoch_end(self):
        values = self.end_evaluation("val")
        select = self.eval_spec.select
        if not self.trainer.sanity_checking and values[select] > self.best.get(select, -1.0):
            self.best = {"epoch": int(self.current_epoch), **values}

    def on_test_epoch_start(self):
        self.begin_evaluation()

    def test_step(self, batch, batch_idx):
        self.evaluation_step(batch)

    def on_test_epoch_end(self):
        self.end_evaluation("test")

    # keep the best-epoch record across checkpoint save/restore (resume)
    def on_save_checkpoint(self, checkpoint):
        checkpoint["mllmrec_best"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint):
        self.best = dict(checkpoint.get("mllmrec_best", self.best))
