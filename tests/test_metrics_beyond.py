"""eval.metrics beyond Recall/NDCG (mllmrec.metrics.beyond), each against an independent computation:
torchmetrics' retrieval metrics where they exist (precision, hit rate, average precision), and a plain
per-user Python loop written from RecBole's definitions (recbole/evaluator/metrics.py) otherwise;
the pass is computed in two blocks of users, as the datamodule does, so the additive sums are checked
too. The planted bugs each test catches are listed in docs/correctness.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_metrics import random_case
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalPrecision

from mllmrec.errors import ConfigError
from mllmrec.metrics import EvalSpec, batch_sums, finalize, make_eval_batch, popularity_groups, zero_sums

ALL = ["recall", "ndcg", "precision", "map", "hit", "coverage", "gini", "avg_popularity", "tail_percentage",
       "recall_groups"]
KS = (3, 10)
CUTS = (0.2, 0.5)


def spec_all(cuts=CUTS) -> EvalSpec:
    return EvalSpec.from_config({"topk": list(KS), "metrics": ALL, "popularity_groups": list(cuts), "valid_metric": "recall@10"})


def ours(scores, users, train, held, spec, popularity, blocks=2):
    """The metrics as a pass computes them: sums over ``blocks`` blocks of users, then finalize
    (``scores[row]``: the scores of ``users[row]``)."""
    n_items = train.shape[1]
    sums = zero_sums(spec, n_items, "cpu")
    groups = popularity_groups(popularity, spec.group_cuts)
    for rows in np.array_split(np.arange(len(users)), blocks):
        batch = {**make_eval_batch(users[rows], train, held), "item_pop": popularity}
        for m, v in batch_sums(scores[torch.from_numpy(rows)].clone(), batch, spec, groups).items():
            sums[m] += v
    return {m: float(v) for m, v in finalize(sums, len(users), spec).items()}


def ranked_lists(scores, users, train, k):
    """Each user's top-k items, training items removed (a plain Python ranking, ties impossible)."""
    out = []
    for row, u in enumerate(users):
        candidates = [i for i in range(train.shape[1]) if i not in set(train[u].indices)]
        out.append(sorted(candidates, key=lambda i: -float(scores[row, i]))[:k])
    return out


def group_of(popularity: np.ndarray, cuts) -> np.ndarray:
    """Popularity groups by a Python sort: most popular first, ties by item id."""
    order = sorted(range(len(popularity)), key=lambda i: (-popularity[i], i))
    groups = np.empty(len(popularity), dtype=int)
    for rank, item in enumerate(order):
        groups[item] = 0 if rank < cuts[0] * len(popularity) else 1 if rank < cuts[1] * len(popularity) else 2
    return groups


def recbole_reference(scores, users, train, held, popularity, k, cuts=CUTS):
    """RecBole's definitions, one user at a time (MAP: 1/min(|R_u|, K); Gini over all n items, counts
    ascending; AveragePopularity: training counts; coverage: distinct / n_items); TailPercentage with
    OUR tail group (RecBole's own tail set differs: docs/correctness.md)."""
    n_items = train.shape[1]
    lists = ranked_lists(scores, users, train, k)
    groups = group_of(popularity, cuts)
    prec, hit, ap, pop, tail = [], [], [], [], []
    group_recall = {g: [] for g in range(3)}
    counts = np.zeros(n_items)
    for row, u in enumerate(users):
        rel = set(held[u].indices)
        top = lists[row]
        rels = [1 if i in rel else 0 for i in top]
        prec.append(sum(rels) / k)
        hit.append(1.0 if sum(rels) else 0.0)
        p_at = [sum(rels[: j + 1]) / (j + 1) for j in range(len(rels))]
        ap.append(sum(p * r for p, r in zip(p_at, rels)) / min(len(rel), k))
        pop.append(sum(popularity[i] for i in top) / len(top))
        tail.append(sum(groups[i] == 2 for i in top) / len(top))
        for g in range(3):
            rel_g = [i for i in rel if groups[i] == g]
            if rel_g:
                group_recall[g].append(sum(1 for i in top if i in rel_g) / len(rel_g))
        for i in top:
            counts[i] += 1
    c = np.sort(counts)  # RecBole's get_gini: zero counts occupy the lowest ranks
    idx = np.arange(1, n_items + 1)
    gini = float(np.sum((2 * idx - n_items - 1) * c) / (n_items * c.sum()))
    out = {f"precision@{k}": np.mean(prec), f"hit@{k}": np.mean(hit), f"map@{k}": np.mean(ap),
           f"avg_popularity@{k}": np.mean(pop), f"tail_percentage@{k}": np.mean(tail),
           f"coverage@{k}": (counts > 0).sum() / n_items, f"gini@{k}": gini}
    for g, name in enumerate(("head", "mid", "tail")):
        out[f"recall@{k}_{name}"] = np.mean(group_recall[g]) if group_recall[g] else 0.0
    return out


def torchmetrics_reference(scores, users, train, held, k):
    """Per-user mean precision, hit rate and average precision (torchmetrics' AP divides by the hits in the
    top k, not by min(|R_u|, k): also returned, per user, to convert)."""
    metrics = {"precision": RetrievalPrecision(top_k=k), "hit": RetrievalHitRate(top_k=k), "ap": RetrievalMAP(top_k=k)}
    for row, u in enumerate(users):
        candidates = np.setdiff1d(np.arange(train.shape[1]), train[u].indices)
        target = torch.from_numpy(np.isin(candidates, held[u].indices))
        preds = scores[row, torch.from_numpy(candidates)] + 1.0  # torchmetrics' AP ignores scores <= 0
        for m in metrics.values():
            m.update(preds, target, indexes=torch.full_like(target, row, dtype=torch.long))
    return {name: float(m.compute()) for name, m in metrics.items()}


CASES = [(1, 50, 40, 20, 8), (2, 40, 60, 10, 30), (3, 64, 100, 50, 5), (0, 30, 25, 5, 1)]


@pytest.fixture(params=CASES, ids=lambda c: f"seed{c[0]}")
def case(request):
    seed, n_users, n_items, max_train, max_held = request.param
    train, held, scores = random_case(seed, n_users, n_items, max_train, max_held)
    rng = np.random.default_rng(50 + seed)
    users = rng.permutation(n_users)[: max(4, n_users * 3 // 4)]
    popularity = np.asarray(train.sum(0)).ravel() + rng.integers(0, 3, n_items)  # ties on purpose
    return train, held, scores[torch.from_numpy(users)], users, popularity


def test_every_metric_matches_recbole_definitions(case):
    train, held, scores, users, popularity = case
    got = ours(scores, users, train, held, spec_all(), torch.as_tensor(popularity, dtype=torch.float64))
    for k in KS:
        ref = recbole_reference(scores, users, train, held, popularity, k)
        for name, value in ref.items():
            assert got[name] == pytest.approx(value, abs=1e-9), name


def test_precision_hit_map_match_torchmetrics(case):
    train, held, scores, users, popularity = case
    spec = EvalSpec.from_config({"topk": list(KS), "metrics": ["precision", "hit", "map"], "valid_metric": "map@10"})
    got = ours(scores, users, train, held, spec, torch.as_tensor(popularity, dtype=torch.float64))
    for k in KS:
        ref = torchmetrics_reference(scores, users, train, held, k)
        assert got[f"precision@{k}"] == pytest.approx(ref["precision"], abs=1e-6)
        assert got[f"hit@{k}"] == pytest.approx(ref["hit"], abs=1e-6)
        # per user: ours = torchmetrics' AP * hits@k / min(|R_u|, k)
        per_user = []
        for row, u in enumerate(users):
            one = ours(scores[row : row + 1], np.array([u]), train, held, spec, torch.as_tensor(popularity), blocks=1)
            tm = torchmetrics_reference(scores[row : row + 1], np.array([u]), train, held, k)
            n_rel = len(held[u].indices)
            hits = round(one[f"precision@{k}"] * k)
            assert one[f"map@{k}"] == pytest.approx(tm["ap"] * hits / min(n_rel, k), abs=1e-6), (u, k)
            per_user.append(one[f"map@{k}"])
        assert got[f"map@{k}"] == pytest.approx(np.mean(per_user), abs=1e-9)


def test_map_equals_torchmetrics_when_every_relevant_item_fits():
    """With at most K held-out items that all land in the top K, both denominators agree."""
    train, held, scores = random_case(11, 20, 30, 0, 2)
    users = np.arange(20)
    spec = EvalSpec.from_config({"topk": [30], "metrics": ["map"], "valid_metric": "map@30"})
    got = ours(scores, users, train, held, spec, torch.ones(30))
    assert got["map@30"] > 0
    assert got["map@30"] == pytest.approx(torchmetrics_reference(scores, users, train, held, 30)["ap"], abs=1e-6)


def test_catalogue_metrics_on_a_hand_case():
    """4 users, 6 items, top-2 lists: items 0 and 1 twice each, item 2 three times, item 3 once."""
    n_items = 6
    score_rows = [[9, 8, 0, 0, 0, 0], [0, 9, 8, 0, 0, 0], [9, 0, 8, 0, 0, 0], [0, 0, 9, 8, 0, 0]]
    scores = torch.tensor(score_rows, dtype=torch.float32) + torch.arange(n_items, 0, -1) * 1e-3
    import scipy.sparse as sp

    train = sp.csr_matrix((4, n_items), dtype=np.float32)
    held = sp.csr_matrix((np.ones(4, np.float32), ([0, 1, 2, 3], [5, 5, 5, 5])), shape=(4, n_items))
    spec = EvalSpec.from_config({"topk": [2], "metrics": ["recall", "coverage", "gini"], "valid_metric": "recall@2"})
    got = ours(scores, np.arange(4), train, held, spec, torch.ones(n_items))
    assert got["coverage@2"] == pytest.approx(4 / 6)
    counts = np.array([0, 0, 1, 2, 2, 3])  # ascending, zeros first
    i = np.arange(1, 7)
    assert got["gini@2"] == pytest.approx(((2 * i - 7) * counts).sum() / (6 * 8))


def test_popularity_groups_shares_and_ties():
    pop = torch.tensor([5.0, 1, 1, 9, 1, 0, 3, 3, 2, 1])
    groups = popularity_groups(pop, (0.2, 0.5)).tolist()
    # rank order: 3 (9), 0 (5), 6 (3), 7 (3), 8 (2), 1, 2, 4 (1: by id), 9 (1), 5 (0)
    assert groups == [0, 2, 2, 0, 2, 2, 1, 1, 1, 2]
    assert groups == group_of(pop.numpy(), (0.2, 0.5)).tolist()


def test_chunked_sums_equal_one_pass():
    """Users in 1 or 5 blocks (or split across ranks): the same metrics, catalogue ones included."""
    train, held, scores = random_case(5, 60, 50, 10, 6)
    users = np.arange(60)
    pop = torch.as_tensor(np.asarray(train.sum(0)).ravel(), dtype=torch.float64)
    one = ours(scores, users, train, held, spec_all(), pop, blocks=1)
    five = ours(scores, users, train, held, spec_all(), pop, blocks=5)
    assert one.keys() == five.keys()
    for m in one:
        assert five[m] == pytest.approx(one[m], abs=1e-12), m


def test_default_names_unchanged_and_new_names():
    assert EvalSpec.default().names == ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
    spec = spec_all()
    assert "recall@10_tail" in spec.names and "gini@3" in spec.names
    assert spec.columns("test")[:2] == ("test/recall@3", "test/recall@10")
    assert {"test/recall@10_head", "test/recall@10_mid", "test/recall@10_tail", "test/coverage@10",
            "test/tail_percentage@10", "test/avg_popularity@3"} <= set(spec.columns("test"))


@pytest.mark.parametrize("node,key", [
    ({"metrics": ["recall", "novelty"]}, "eval.metrics"),
    ({"metrics": []}, "eval.metrics"),
    ({"metrics": ["recall", "recall"]}, "eval.metrics"),
    ({"popularity_groups": [0.0, 0.5]}, "eval.popularity_groups"),
    ({"popularity_groups": [0.2, 1.0]}, "eval.popularity_groups"),
    ({"popularity_groups": [0.6, 0.5]}, "eval.popularity_groups"),
    ({"popularity_groups": [0.2]}, "eval.popularity_groups"),
    ({"metrics": ["recall", "coverage"], "valid_metric": "coverage@20"}, "eval.valid_metric"),
    ({"metrics": ["recall", "gini"], "valid_metric": "gini@20"}, "eval.valid_metric"),
    ({"metrics": ["recall", "avg_popularity"], "valid_metric": "avg_popularity@20"}, "eval.valid_metric"),
    ({"metrics": ["ndcg"]}, "eval.valid_metric"),  # recall@20 no longer computed
])
def test_bad_eval_settings_are_one_line_errors(node, key):
    with pytest.raises(ConfigError) as err:
        EvalSpec.from_config(node)
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_group_recall_and_map_can_select():
    assert EvalSpec.from_config({"metrics": ["recall", "recall_groups"], "valid_metric": "recall@20_tail"}).select \
        == "val/recall@20_tail"
    assert EvalSpec.from_config({"metrics": ["map"], "valid_metric": "map@10"}).names == ("map@10", "map@20")


def test_metrics_stay_in_range(case):
    train, held, scores, users, popularity = case
    got = ours(scores, users, train, held, spec_all(), torch.as_tensor(popularity, dtype=torch.float64))
    for name, value in got.items():
        if not name.startswith("avg_popularity"):
            assert 0.0 <= value <= 1.0 + 1e-12, (name, value)
        assert math.isfinite(value)
