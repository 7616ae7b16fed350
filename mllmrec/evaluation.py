"""Full-ranking evaluation and top-K ranking of a model that scores y_ui = h_u . h_i.

:class:`RankingEvaluation` is the one public entry that Lightning's validation/test hooks
(:class:`mllmrec.models.base.RankingModule`), :mod:`mllmrec.bench` and :mod:`mllmrec.recommend` use:
one representation pass, then the users scored in blocks, each block's training items masked
and the rest ranked by :func:`mllmrec.metrics.masked_topk`.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch

from mllmrec.distributed import all_reduce_sum
from mllmrec.errors import DivergedError
from mllmrec.metrics import EvalSpec, batch_sums, finalize, masked_topk, pairs_of_rows, popularity_groups, zero_sums


class RankingEvaluation:
    """Mixin of :class:`mllmrec.models.base.RankingModule`: needs ``representations()``, ``device`` and
    ``log`` (a LightningModule's)."""

    _eval_reprs: tuple[torch.Tensor, torch.Tensor] | None = None  # (h_users, h_items^T) of one pass
    _eval_spec: EvalSpec | None = None
    _item_groups: torch.Tensor | None = None  # the items' popularity groups during a pass (eval.metrics)
    _score_buffer: torch.Tensor | None = None  # one users x items block, reused by every batch of a pass

    @property
    def eval_spec(self) -> EvalSpec:
        """The cut-offs and the selecting metric (``conf/eval``; :func:`mllmrec.pipeline.build_model` sets
        them from the run's config, else ``conf/eval/default.yaml``)."""
        if self._eval_spec is None:
            self._eval_spec = EvalSpec.default()
        return self._eval_spec

    @eval_spec.setter
    def eval_spec(self, spec: EvalSpec) -> None:
        self._eval_spec = spec

    def score_users(self, users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [len(users), n_items]; inside a pass (:meth:`scoring`, an evaluation) from its
        representations, else from a fresh ``representations()``; written into ``out`` when given."""
        if self._eval_reprs is not None:
            h_u, h_i_t = self._eval_reprs
        else:
            h_u, h_i = self.representations()
            h_i_t = h_i.T
        return h_u[users] @ h_i_t if out is None else torch.mm(h_u[users], h_i_t, out=out)

    @contextmanager
    def scoring(self):
        """Within it, :meth:`score_users` and :meth:`top_k` reuse one representation pass."""
        self._cache_representations()
        try:
            yield self
        finally:
            self._eval_reprs = None

    @torch.no_grad()
    def _cache_representations(self) -> None:
        h_u, h_i = self.representations()
        for side, h in (("user", h_u), ("item", h_i)):
            # ranking NaN scores still gives metrics in [0, 1]: refuse them instead (one reduction per pass)
            if not bool(torch.isfinite(h).all()):
                epoch = getattr(getattr(self, "_trainer", None), "current_epoch", None)
                raise DivergedError(f"{type(self).__name__}: non-finite {side} representations"
                                    f"{'' if epoch is None else f' at epoch {epoch}'} (NaN or inf; a diverged "
                                    "training, e.g. a learning rate too high, or a broken model): its metrics "
                                    "would be meaningless")
        self._eval_reprs = (h_u, h_i.T.contiguous())  # items x d -> d x items once: faster GEMMs

    @torch.no_grad()
    def top_k(self, users: np.ndarray, k: int, train_matrix: sp.spmatrix) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, items) of the ``k`` best items per user, training items masked out, best first.

        Call it inside :meth:`scoring` when ranking the users in several blocks.
        """
        rows, cols = pairs_of_rows(train_matrix, users)
        scores = self.score_users(torch.as_tensor(users, device=self.device))
        values, items = masked_topk(scores, torch.as_tensor(rows, device=scores.device),
                                    torch.as_tensor(cols, device=scores.device), k)
        return values, items

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The metrics of ``eval_spec`` (mean Recall/NDCG@K by default), by metric name, over the users of
        prebuilt evaluation batches (:func:`mllmrec.metrics.make_eval_batch`, on the model's device)."""
        self.begin_evaluation()
        try:
            for batch in batches:
                self.evaluation_step(batch)
        finally:
            self._eval_reprs = self._score_buffer = None  # a failed pass leaves no stale representations behind either
        return {m: float(v) for m, v in self._evaluation_means().items()}

    def begin_evaluation(self) -> None:
        """Start a pass over evaluation batches: compute the representations once, zero the sums (all
        additive: users' metric sums, group user counts, item-count vectors; :mod:`mllmrec.metrics.beyond`)."""
        self._cache_representations()
        self._score_buffer = None  # a pass's block is its own (Lightning validates in inference mode)
        self._sums = zero_sums(self.eval_spec, self._eval_reprs[1].shape[1], self.device)
        self._count = 0
        self._item_groups = None  # popularity groups, from the first batch's item_pop (once per pass)

    def evaluation_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Score, mask and rank one batch's users; add their metrics to the pass."""
        spec = self.eval_spec
        if spec.needs_popularity and self._item_groups is None:
            if "item_pop" not in batch:
                raise ValueError(f"eval.metrics={list(spec.metrics)} needs the items' training popularity: "
                                 "evaluation batches without item_pop (built by RecDataModule.setup)")
            self._item_groups = popularity_groups(batch["item_pop"], spec.group_cuts)
        scores = self._pass_scores(batch["users"])
        for m, v in batch_sums(scores, batch, spec, self._item_groups).items():
            self._sums[m] += v
        self._count += int(batch["users"].shape[0])

    def _pass_scores(self, users: torch.Tensor) -> torch.Tensor:
        """:meth:`score_users` of one batch of a pass, written into a block reused by every batch: on a
        CPU a fresh users x items block per batch costs its page faults, half the scoring time at 200k
        items (docs/scale.md). Same GEMM, same values."""
        h_i_t = self._eval_reprs[1]
        n, buf = users.shape[0], self._score_buffer
        if buf is None or buf.shape[0] < n:  # the pass's own block (begin_evaluation resets it)
            buf = self._score_buffer = torch.empty(n, h_i_t.shape[1], dtype=h_i_t.dtype, device=h_i_t.device)
        return self.score_users(users, out=buf[:n])

    def _evaluation_means(self) -> dict[str, torch.Tensor]:
        """End the pass: each metric from the pass's sums (float64; per-user metrics: the mean over the users).
        With several processes (each evaluating its share of the users), every sum (scalars, group counts,
        item-count vectors) and the count of all ranks first, in one all-reduce, so every rank gets the
        exact metrics over all users."""
        self._eval_reprs = self._score_buffer = None  # the pass is over: free its block
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            keys = list(self._sums)
            flat = [self._sums[k].reshape(-1) for k in keys]
            count = torch.tensor([float(self._count)], dtype=torch.float64, device=self.device)
            total = all_reduce_sum(torch.cat([*flat, count]), trainer)
            parts = torch.split(total[:-1], [f.numel() for f in flat])
            self._sums = {k: part.reshape(self._sums[k].shape) for k, part in zip(keys, parts)}
            self._count = int(total[-1].item())
        return finalize(self._sums, self._count, self.eval_spec)

    def end_evaluation(self, prefix: str) -> dict[str, float]:
        """End the pass and log its means as ``<prefix>/<metric>`` (float32, as logged); return them."""
        values = {f"{prefix}/{m}": v.float() for m, v in self._evaluation_means().items()}
        # several processes: the values are already the same on every rank (all-reduced sums); Lightning's
        # sync with max keeps them exact and says so (a mean of equal floats need not be exact)
        synced = {"sync_dist": True, "reduce_fx": "max"} if self.trainer.world_size > 1 else {}
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith(self.eval_spec.valid_metric), **synced)
        return {k: float(v) for k, v in values.items()}
