"""Evaluation without the full score matrix: the model scores, masks and ranks one block of users
at a time, and its metrics equal those of a dense NumPy reference over the whole score matrix
(written here from the MMRec protocol, not from mllmrec.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mllmrec.metrics import EvalSpec, make_eval_batch

METRICS = EvalSpec.default().names
from mllmrec.models.base import RankingModule

N_USERS, N_ITEMS, DIM = 90, 260, 16
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")  # no Trainer here


class FixedReprs(RankingModule):
    """A ranking model with given final representations (what any trained model hands to evaluation)."""

    def __init__(self, h_u: torch.Tensor, h_i: torch.Tensor):
        super().__init__()
        self.register_buffer("h_u", h_u)
        self.register_buffer("h_i", h_i)
        self.score_shapes: list[tuple[int, int]] = []

    def representations(self):
        return self.h_u, self.h_i

    def _pass_scores(self, users):  # the scores of one evaluation batch (one reused block)
        scores = super()._pass_scores(users)
        self.score_shapes.append(tuple(scores.shape))
        return scores


def case(seed=0):
    rng = np.random.default_rng(seed)
    h_u = rng.standard_normal((N_USERS, DIM)).astype(np.float32)
    h_i = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    train = sp.random(N_USERS, N_ITEMS, density=0.06, format="csr", random_state=seed + 1, dtype=np.float32)
    held = sp.random(N_USERS, N_ITEMS, density=0.04, format="csr", random_state=seed + 2, dtype=np.float32)
    held = sp.csr_matrix((held - train.multiply(1e9)) > 0, dtype=np.float32)  # held-out items are not training items
    users = np.flatnonzero((np.diff(held.indptr) > 0) & (np.diff(train.indptr) > 0))
    return h_u, h_i, train, held, users


def dense_reference(h_u, h_i, train, held, users) -> dict[str, float]:
    scores = h_u.astype(np.float64) @ h_i.astype(np.float64).T  # the full matrix, all users at once
    scores[train.toarray() > 0] = -np.inf
    out = {m: [] for m in METRICS}
    for u in users:
        truth = set(held[u].indices)
        ranked = np.argsort(-scores[u], kind="stable")[:20]
        hits = np.array([i in truth for i in ranked], dtype=float)
        for k in (10, 20):
            gains = hits[:k] / np.log2(np.arange(2, k + 2))
            ideal = (1 / np.log2(np.arange(2, min(len(truth), k) + 2))).sum()
            out[f"recall@{k}"].append(hits[:k].sum() / len(truth))
            out[f"ndcg@{k}"].append(gains.sum() / ideal)
    return {m: float(np.mean(v)) for m, v in out.items()}


def blockwise(h_u, h_i, train, held, users, block: int, device: str = "cpu"):
    model = FixedReprs(torch.from_numpy(h_u), torch.from_numpy(h_i)).to(device)
    batches = (make_eval_batch(users[start : start + block], train, held) for start in range(0, len(users), block))
    values = model.evaluate({k: v.to(device) for k, v in batch.items()} for batch in batches)
    assert model._score_buffer is None  # the pass's reused score block is released with it
    return {m: values[m] for m in METRICS}, model.score_shapes


@pytest.mark.parametrize("block", [7, 32, 1000])
def test_blockwise_evaluation_equals_the_dense_reference(block):
    h_u, h_i, train, held, users = case()
    assert len(users) > 40
    expected = dense_reference(h_u, h_i, train, held, users)
    got, shapes = blockwise(h_u, h_i, train, held, users, block)
    for m in METRICS:
        assert got[m] == pytest.approx(expected[m], abs=1e-6), m
    assert expected["recall@20"] > 0.02  # there are hits: the comparison means something
    # never more than one block of scores: [<= block users, all items] per step
    assert shapes and all(r <= block and c == N_ITEMS for r, c in shapes)
    assert sum(r for r, _ in shapes) == len(users)


@pytest.mark.parametrize("side, bad", [("user", float("nan")), ("item", float("inf"))])
def test_non_finite_representations_are_refused_not_ranked(side, bad):
    """Ranking NaN scores gives metrics in [0, 1] (topk orders NaN first): a diverged model must fail
    loudly instead. One bad entry on either side is enough."""
    from mllmrec.errors import DivergedError

    h_u, h_i, train, held, users = case()
    (h_u if side == "user" else h_i)[3, 5] = bad
    with pytest.raises(DivergedError, match=f"non-finite {side} representations"):
        blockwise(h_u, h_i, train, held, users, block=32)
