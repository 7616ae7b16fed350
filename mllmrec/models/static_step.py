"""A static-shape BPR training step, captured whole with CUDA graphs and replayed (``model.cuda_graphs``).

On a GPU the MLLMRec epoch is bound by per-step overhead (Python, kernel launches), not by the
matrix products. This step makes every batch the same shape, so that one step — row gathers,
both towers, BPR, backward and the Adam update (``capturable=True``) — is captured once as a
CUDA graph and then replayed with one launch per step:

- the batch size is fixed (that of the first batch, normally ``data.batch_size``); the last,
  shorter batch of an epoch is padded with rows of weight 0, and the loss is the weighted sum
  with weight 1/n_real per real row, i.e. exactly the mean over the real rows;
- the towers run on the batch's rows as drawn (no ``torch.unique``: its size depends on the data);
- the first ``WARMUP`` steps run eagerly on a side stream (they are real training steps: they
  also initialise Adam's state and the libraries' workspaces), the next one is captured and
  every later one replays the graph after copying the batch into the graph's input tensors.

Lightning stays the trainer (manual optimisation). The datamodule hands over the whole epoch as
one Lightning batch (``RecDataModule.epoch_as_one_batch``) and the model runs its batch-size steps
in a loop, so Lightning's per-batch loop and hooks run once per epoch. Every step goes through
``LightningOptimizer.step(closure)``, so the global step, checkpoints, resume, early stopping and
loggers behave as with automatic optimisation. :class:`ReplayableAdam` is Adam whose ``step``
only runs the closure while a captured graph (which contains the update) is replayed; it takes
its settings from the configured ``model.optimizer`` (:func:`replayable_adam`).

Without CUDA (``cuda_graphs=true`` on a CPU) the same static-shape step runs eagerly: the tests
use that to check it against the normal step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from mllmrec.errors import ConfigError

log = logging.getLogger(__name__)

WARMUP = 3
MODES = {"false": False, "true": True, "auto": "auto"}


def resolve_mode(mode, device: torch.device, ui_layers: int = 0) -> tuple[bool, bool]:
    """(use the static-shape step, capture it with CUDA graphs) for ``model.cuda_graphs=mode``."""
    key = str(mode).lower()
    if key not in MODES:
        raise ConfigError("model.cuda_graphs", f"must be auto, true or false, got {mode!r}")
    wanted = MODES[key]
    if wanted is False or (wanted == "auto" and (device.type != "cuda" or ui_layers > 0)):
        return False, False
    if ui_layers > 0:
        raise ConfigError("model.cuda_graphs", "the static-shape step does not cover model.ui_layers > 0 (w/ GCN_UI)")
    if device.type != "cuda":
        log.warning("model.cuda_graphs=true on %s: running the static-shape step eagerly (no CUDA graphs)", device)
    return True, device.type == "cuda"


def pad_batch(users, pos, neg, size: int):
    """(users, pos, neg, weight), padded to ``size`` rows; real rows weigh 1/n_real, padding 0."""
    n = users.shape[0]
    if n > size:
        raise ValueError(f"a batch of {n} rows does not fit the static batch size {size}")
    weight = torch.full((size,), 1.0 / n, dtype=torch.float32, device=users.device)
    if n == size:
        return users, pos, neg, weight
    weight[n:] = 0.0
    pad = torch.zeros(size - n, dtype=users.dtype, device=users.device)  # row 0: any valid index
    return torch.cat([users, pad]), torch.cat([pos, pad]), torch.cat([neg, pad]), weight


def weighted_bpr_loss(h_u, h_pos, h_neg, weight) -> torch.Tensor:
    """-sum_r w_r log sigmoid(y_ur - y_u'r): the BPR mean over the real rows when w = 1/n_real there, 0 elsewhere."""
    return -(weight * F.logsigmoid((h_u * h_pos).sum(1) - (h_u * h_neg).sum(1))).sum()


def static_loss(model, users, pos, neg, weight) -> torch.Tensor:
    """The BPR loss of a padded batch through ``model``'s towers (shapes depend on the batch size only)."""
    h_pos, h_neg = model.item_repr(torch.cat([pos, neg])).split(users.shape[0])
    return weighted_bpr_loss(model.user_repr(users), h_pos, h_neg, weight)


class ReplayableAdam(torch.optim.Adam):
    """Adam whose update can live inside a captured CUDA graph.

    While ``replaying`` is set, ``step(closure)`` only runs the closure, which replays the graph
    (forward, backward and this optimizer's captured update); otherwise it is plain Adam.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replaying = False

    def step(self, closure=None):
        if self.replaying:
            with torch.enable_grad():
                return closure()
        return super().step(closure)

    def update(self):
        """Adam's own update (what the graph captures)."""
        return torch.optim.Adam.step(self)


def replayable_adam(factory, params, capturable: bool) -> ReplayableAdam:
    """:class:`ReplayableAdam` with the keywords of the configured optimizer, ``model.optimizer``
    (a ``functools.partial`` of ``torch.optim.Adam``), and ``capturable`` set for the graph."""
    func = getattr(factory, "func", None)
    if not (isinstance(func, type) and issubclass(func, torch.optim.Adam)) or factory.args:
        raise ConfigError("model.optimizer", "model.cuda_graphs needs torch.optim.Adam with `_partial_: true` "
                          f"and keyword settings only, got {factory!r}")
    return ReplayableAdam(params, **{**factory.keywords, "capturable": capturable})


class StaticStep:
    """Runs training steps of a fixed batch size: eagerly, then (CUDA) as one replayed graph."""

    def __init__(self, model, capture: bool, warmup: int = WARMUP):
        self.model = model
        self.capture = capture
        self.warmup = warmup
        self.size: int | None = None
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] | None = None  # the graph's static input tensors
        self.loss: torch.Tensor | None = None  # the graph's output

    def __call__(self, optimizer, users, pos, neg) -> torch.Tensor:
        """One training step on (users, pos, neg) through ``optimizer`` (a LightningOptimizer or Adam)."""
        if self.size is None:
            self.size = int(users.shape[0])
        batch = pad_batch(users, pos, neg, self.size)
        inner = getattr(optimizer, "optimizer", optimizer)
        self.steps += 1
        if not self.capture or self.steps <= self.warmup:
            return self._eager(optimizer, inner, batch)
        if self.graph is None:
            self._capture(inner, batch)
        for dst, src in zip(self.inputs, batch):
            dst.copy_(src)
        inner.replaying = True
        try:
            optimizer.step(closure=self._replay)
        finally:
            inner.replaying = False
        return self.loss

    def _replay(self):
        self.graph.replay()
        return self.loss

    def _eager(self, optimizer, inner, batch) -> torch.Tensor:
        def closure():
            inner.zero_grad(set_to_none=True)
            loss = static_loss(self.model, *batch)
            loss.backward()
            return loss

        if not self.capture:
            return self._step_returning_loss(optimizer, closure)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = self._step_returning_loss(optimizer, closure)
        torch.cuda.current_stream().wait_stream(stream)
        return loss

    @staticmethod
    def _step_returning_loss(optimizer, closure) -> torch.Tensor:
        box = []
        optimizer.step(closure=lambda: box.append(closure()) or box[-1])
        return box[-1].detach()

    def _capture(self, inner: ReplayableAdam, batch) -> None:
        self.inputs = tuple(t.clone() for t in batch)
        inner.zero_grad(set_to_none=True)  # the captured backward allocates the grads it replays into
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = static_loss(self.model, *self.inputs)
            self.loss.backward()
            inner.update()
        log.info("CUDA graph captured: the training step (batch %d) now replays as one graph", self.size)
