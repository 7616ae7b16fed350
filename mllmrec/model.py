"""LightningModules: MLLMRec (SPEC steps 13-15) and the shared ranking/evaluation machinery.

Every model here scores y_ui = h_u . h_i. :class:`RankingModule` holds what they share: BPR
training, the optimizer, full-ranking validation/test with prebuilt batches, and the best-epoch
record.

Built from config (``conf/model/*.yaml``, :func:`mllmrec.train.build_model`), every module takes
``(inputs, optimizer, **its yaml's keys)``: ``inputs`` is a :class:`mllmrec.pipeline.Inputs`
(dataset + prepared features), of which the class's ``needs`` names what the pipeline must
prepare (``"ids"``: interactions only, ``"features"``: reason -> encode -> graph user/item
features, ``"modalities"``: item modality features); ``optimizer`` is a factory called with the
parameters, the yaml's ``{_target_: torch.optim.Adam, _partial_: true, lr: ...}`` (:func:`adam`
in code). Settings from other groups come by interpolation (FREEDOM's ``refine: ${graph.refine}``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mllmrec.evaluation import RankingEvaluation
from mllmrec.static_step import StaticStep, replayable_adam, resolve_mode

if TYPE_CHECKING:
    from mllmrec.pipeline import Inputs

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def adam(lr: float = 1e-3, weight_decay: float = 0.0, fused: bool = True) -> OptimizerFactory:
    """Adam as ``conf/model/*.yaml`` configures it, as a factory of the parameters."""
    return functools.partial(torch.optim.Adam, lr=lr, weight_decay=weight_decay, fused=fused)


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


def rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` with a deterministic backward for repeated indices.

    On CPU with several threads, the backward of advanced indexing (``index_put_`` with
    accumulation) adds the gradients of repeated rows in a varying order, so two runs of the same
    config drift apart; ``embedding``'s backward sums them in a fixed order.
    """
    return F.embedding(index, table)


def bpr_loss(h_u: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(y_ui - y_uj)."""
    return -F.logsigmoid((h_u * h_pos).sum(1) - (h_u * h_neg).sum(1)).mean()


class SymmetricGraph(nn.Module):
    """A fixed symmetric sparse matrix A applied as ``A @ x`` with autograd (grad = A @ grad).

    On CPU it multiplies with SciPy's CSR kernel (several times faster than torch's CPU sparse
    matmul here); on CUDA with torch's sparse CSR. Moves with the module (``.to(device)``).
    """

    def __init__(self, matrix: sp.spmatrix):
        super().__init__()
        self.csr = sp.csr_matrix(matrix, dtype=np.float32)
        self.register_buffer("indptr", torch.from_numpy(self.csr.indptr.astype(np.int64)), persistent=False)
        self.register_buffer("indices", torch.from_numpy(self.csr.indices.astype(np.int64)), persistent=False)
        self.register_buffer("values", torch.from_numpy(self.csr.data), persistent=False)
        self._cuda: torch.Tensor | None = None

    @property
    def shape(self):
        return self.csr.shape

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(self.csr @ x.detach().numpy()))
        if self._cuda is None or self._cuda.device != x.device:
            self._cuda = torch.sparse_csr_tensor(self.indptr, self.indices, self.values, size=self.shape)
        return self._cuda @ x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SymmetricMatmul.apply(x, self)


class _SymmetricMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, graph):
        ctx.graph = graph
        return graph._matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.graph._matmul(grad), None


def bipartite_norm_adj(train: sp.spmatrix) -> "SymmetricGraph":
    """D^-1/2 A D^-1/2 of the (users + items) bipartite training graph (MMRec's, +1e-7 in D)."""
    train = sp.csr_matrix(train, dtype=np.float32)
    n_users, n_items = train.shape
    adj = sp.bmat([[None, train], [train.T, None]], format="csr", dtype=np.float32)
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(axis=1)).ravel() + 1e-7
    d = sp.diags(deg ** -0.5)
    return SymmetricGraph(d @ adj @ d)


def lightgcn_layers(adj: "SymmetricGraph", emb: torch.Tensor, layers: int, reduce: str = "sum") -> torch.Tensor:
    out = [emb]
    for _ in range(layers):
        emb = adj(emb)
        out.append(emb)
    stacked = torch.stack(out, 0)
    return stacked.sum(0) if reduce == "sum" else stacked.mean(0)


class RankingModule(RankingEvaluation, pl.LightningModule):
    """Shared BPR training loop pieces and full-ranking evaluation (:mod:`mllmrec.evaluation`).

    ``optimizer``: a factory of the parameters (see the module doc); None: :func:`adam`'s default.
    """

    needs: ClassVar[str] = "ids"  # the inputs the pipeline prepares: "ids" | "features" | "modalities"

    def __init__(self, optimizer: OptimizerFactory | None = None):
        super().__init__()
        self.optimizer_factory = optimizer or adam()
        self.best = {"epoch": -1, "val/recall@20": -1.0}

    # subclasses implement these two
    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def representations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (h_users [n_users, d], h_items [n_items, d])."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        users, pos, neg = batch
        loss = self.batch_loss(users, pos, neg)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=users.shape[0])
        return loss

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    # ---- evaluation: Lightning's hooks over the public entry (mllmrec/evaluation.py) ------------
    def on_validation_epoch_start(self):
        self.begin_evaluation()

    def validation_step(self, batch, batch_idx):
        self.evaluation_step(batch)

    def on_validation_epoch_end(self):
        values = self.end_evaluation("val")
        if not self.trainer.sanity_checking and values["val/recall@20"] > self.best["val/recall@20"]:
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
            return bpr_loss(rows(h_u_all, users), rows(h_i_all, pos), rows(h_i_all, neg))
        items = torch.cat([pos, neg])
        if users.device.type != "cpu":
            # on a GPU the towers over the batch's rows cost less than torch.unique's sort + sync
            h_pos, h_neg = self.item_repr(items).split(users.shape[0])
            return bpr_loss(self.user_repr(users), h_pos, h_neg)
        uniq_u, inv_u = torch.unique(users, return_inverse=True)
        h_u = rows(self.user_repr(uniq_u), inv_u)
        uniq_i, inv_i = torch.unique(items, return_inverse=True)
        h_pos, h_neg = rows(self.item_repr(uniq_i), inv_i).split(users.shape[0])
        return bpr_loss(h_u, h_pos, h_neg)

    # ---- model.cuda_graphs: the static-shape training step (mllmrec/static_step.py) ----------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        use, capture = resolve_mode(self.hparams.cuda_graphs, self.trainer.strategy.root_device, self.ui_layers)
        self._static = StaticStep(self, capture) if use else None
        self.automatic_optimization = not use  # the step drives Adam itself (manual optimisation)
        dm = self.trainer.datamodule
        self._steps_of = None
        if dm is not None and hasattr(dm, "epoch_as_one_batch"):
            dm.epoch_as_one_batch = use
            self._steps_of = int(dm.batch_size) if use else None

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
