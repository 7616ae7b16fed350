"""mllmrec.metrics against torchmetrics' retrieval metrics and a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

from mllmrec.metrics import EvalSpec, evaluate_batch, make_eval_batch, recall_ndcg

KS = EvalSpec.default().topk
METRICS = EvalSpec.default().names


def random_case(seed: int, n_users: int, n_items: int, max_train: int, max_heldout: int):
    """Random scores (no ties) and disjoint random train / held-out sets; every user has >= 1 held-out item."""
    rng = np.random.default_rng(seed)
    train_rows, train_cols, held_rows, held_cols = [], [], [], []
    for u in range(n_users):
        n_train = int(rng.integers(0, max_train + 1))
        n_held = int(rng.integers(1, max_heldout + 1))
        items = rng.permutation(n_items)[: n_train + n_held]
        train_rows += [u] * n_train
        train_cols += items[:n_train].tolist()
        held_rows += [u] * n_held
        held_cols += items[n_train:].tolist()
    shape = (n_users, n_items)
    train = sp.csr_matrix((np.ones(len(train_rows), np.float32), (train_rows, train_cols)), shape=shape)
    held = sp.csr_matrix((np.ones(len(held_rows), np.float32), (held_rows, held_cols)), shape=shape)
    scores = torch.from_numpy(rng.permutation(n_users * n_items).reshape(shape).astype(np.float32))
    return train, held, scores


def torchmetrics_reference(scores: torch.Tensor, users: np.ndarray, train: sp.csr_matrix, held: sp.csr_matrix, k: int):
    """Per-user mean Recall@k / NDCG@k, each user's train items removed from its candidate list."""
    recall = RetrievalRecall(top_k=k)
    ndcg = RetrievalNormalizedDCG(top_k=k)
    for row, u in enumerate(users):
        candidates = np.setdiff1d(np.arange(train.shape[1]), train[u].indices)
        target = torch.from_numpy(np.isin(candidates, held[u].indices))
        preds = scores[row, torch.from_numpy(candidates)]
        indexes = torch.full_like(target, row, dtype=torch.long)
        recall.update(preds, target, indexes=indexes)
        ndcg.update(preds, target, indexes=indexes)
    return float(recall.compute()), float(ndcg.compute())


CASES = [
    # seed, n_users, n_items, max_train, max_heldout
    (0, 30, 25, 5, 1),  # exactly one held-out item each
    (1, 50, 40, 20, 8),
    (2, 40, 60, 10, 30),  # more held-out items than K for some users
    (3, 64, 100, 50, 5),  # heavy masking
    (4, 20, 25, 0, 25),  # no train items at all, up to all items held out
]


@pytest.mark.parametrize("seed,n_users,n_items,max_train,max_heldout", CASES)
def test_matches_torchmetrics(seed, n_users, n_items, max_train, max_heldout):
    train, held, scores_all = random_case(seed, n_users, n_items, max_train, max_heldout)
    # evaluate a shuffled subset of users, in two batches, as the datamodule does
    rng = np.random.default_rng(100 + seed)
    users = rng.permutation(n_users)[: max(2, n_users * 3 // 4)]
    per_user = {m: [] for m in METRICS}
    for chunk in np.array_split(users, 2):
        batch = make_eval_batch(chunk, train, held)
        out = evaluate_batch(scores_all[torch.from_numpy(chunk)], batch, KS)  # a copy: masking may be in place
        assert set(out) == set(METRICS)
        for m, v in out.items():
            assert v.shape == (len(chunk),)
            per_user[m].append(v)
    ours = {m: float(torch.cat(v).mean()) for m, v in per_user.items()}
    for k in KS:
        ref_recall, ref_ndcg = torchmetrics_reference(scores_all[torch.from_numpy(users)], users, train, held, k)
        assert ours[f"recall@{k}"] == pytest.approx(ref_recall, abs=1e-6), k
        assert ours[f"ndcg@{k}"] == pytest.approx(ref_ndcg, abs=1e-6), k
        assert 0.0 <= ours[f"recall@{k}"] <= 1.0 and 0.0 <= ours[f"ndcg@{k}"] <= 1.0


def test_per_user_values_match_torchmetrics():
    """Not just the means: every user's value agrees with a one-user torchmetrics computation."""
    train, held, scores = random_case(7, 12, 30, 8, 12)
    users = np.arange(12)
    out = evaluate_batch(scores.clone(), make_eval_batch(users, train, held), KS)  # may mask in place
    for u in users:
        for k in KS:
            r, n = torchmetrics_reference(scores[u : u + 1], np.array([u]), train, held, k)
            assert float(out[f"recall@{k}"][u]) == pytest.approx(r, abs=1e-6)
            assert float(out[f"ndcg@{k}"][u]) == pytest.approx(n, abs=1e-6)


def test_hand_computed_single_user():
    n_items = 25
    # scores decrease with the item index: the ranking is 0, 1, 2, ...; item 0 is a train item
    scores = torch.arange(n_items, 0, -1, dtype=torch.float32).unsqueeze(0)
    train = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, n_items))
    held = sp.csr_matrix(([1.0, 1.0], ([0, 0], [2, 15])), shape=(1, n_items))
    out = evaluate_batch(scores, make_eval_batch(np.array([0]), train, held), KS)
    # after masking item 0: item 2 is at rank 2, item 15 at rank 15
    dcg10 = 1 / math.log2(3)
    dcg20 = 1 / math.log2(3) + 1 / math.log2(16)
    idcg = 1 + 1 / math.log2(3)
    assert float(out["recall@10"][0]) == pytest.approx(0.5)
    assert float(out["recall@20"][0]) == pytest.approx(1.0)
    assert float(out["ndcg@10"][0]) == pytest.approx(dcg10 / idcg)
    assert float(out["ndcg@20"][0]) == pytest.approx(dcg20 / idcg)


def test_masking_removes_train_items_from_the_ranking():
    """A held-out item ranked just below a very highly scored train item moves into the top 1."""
    n_items = 25
    scores = torch.zeros(1, n_items)
    scores[0, 3] = 10.0  # train item, masked
    scores[0, 7] = 5.0  # held-out item
    train = sp.csr_matrix(([1.0], ([0], [3])), shape=(1, n_items))
    held = sp.csr_matrix(([1.0], ([0], [7])), shape=(1, n_items))
    batch = make_eval_batch(np.array([0]), train, held)
    out = evaluate_batch(scores.clone(), batch, ks=(1,))
    assert float(out["recall@1"][0]) == 1.0
    assert float(out["ndcg@1"][0]) == 1.0
    # without the mask the train item would take rank 1
    no_mask = make_eval_batch(np.array([0]), sp.csr_matrix((1, n_items), dtype=np.float32), held)
    assert float(evaluate_batch(scores.clone(), no_mask, ks=(1,))["recall@1"][0]) == 0.0


def test_recall_ndcg_ideal_dcg_uses_min_of_heldout_and_k():
    # 3 users, hit patterns over 4 ranks; n_pos larger than k for the last user
    hits = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    n_pos = torch.tensor([1, 2, 10])
    out = recall_ndcg(hits, n_pos, ks=(2, 4))
    d = [1 / math.log2(r + 2) for r in range(4)]
    assert out["recall@2"].tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert out["recall@4"].tolist() == pytest.approx([1.0, 1.0, 0.4])
    assert out["ndcg@2"].tolist() == pytest.approx([1.0, d[1] / (d[0] + d[1]), 1.0])
    assert out["ndcg@4"].tolist() == pytest.approx([1.0, (d[1] + d[3]) / (d[0] + d[1]), 1.0])
