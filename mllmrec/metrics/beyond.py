"""Every metric of ``eval.metrics`` from ONE ranking per evaluation block: the top-K indices that
Recall/NDCG use (:func:`mllmrec.metrics.ranking.masked_topk`), nothing ranked twice.

An evaluation pass keeps additive sums only (:func:`zero_sums`, :func:`batch_sums`), so blocks of
users, and ranks of a distributed run, combine by adding them; :func:`finalize` turns the sums into
the metrics. Definitions (binary relevance; K' = min(K, candidates); the RecBole/MMRec name where
one exists, differences named in ``docs/correctness.md``):

* per user, averaged over the evaluated users: ``recall`` and ``ndcg`` (:func:`recall_ndcg`),
  ``precision`` = hits@K / K, ``hit`` = 1 if any hit, ``map`` = sum_{j<=K} P@j rel_j / min(|R_u|, K)
  (MMRec's and RecBole's denominator), ``avg_popularity`` = mean training popularity (number of
  training interactions) of the top-K items, ``tail_percentage`` = share of the top-K items in
  the tail popularity group;
* ``recall_groups``: Recall@K restricted to the held-out items of one popularity group (hits among
  them / their number), averaged over the users who have held-out items in that group;
* over the catalogue, from the multiset of all users' top-K items (an item-count vector per pass):
  ``coverage`` = distinct recommended items / all items, ``gini`` = the Gini index of the item counts
  over all items (zeros included), sum_i (2i - n - 1) c_(i) / (n sum c), counts ascending.

Popularity groups (:func:`popularity_groups`): the items ranked by training popularity, most popular
first, ties by item id; head = the first ``cuts[0]`` share of them, mid up to ``cuts[1]``, tail the rest.
"""

from __future__ import annotations

import torch

from mllmrec.metrics.ranking import hits_at, masked_topk, recall_ndcg
from mllmrec.metrics.spec import CATALOGUE, GROUPED, GROUPS, EvalSpec

HEAD, MID, TAIL = range(3)
USERS_KEY = "_users@{k}_{g}"  # users with held-out items in group g (the group recall's denominator)
ITEMS_KEY = "_items@{k}"  # how often each item is in a top-K list (coverage, gini)


def popularity_groups(popularity: torch.Tensor, cuts: tuple[float, float]) -> torch.Tensor:
    """Group of every item (0 head, 1 mid, 2 tail) by training ``popularity`` [n_items]: items ranked
    most popular first (ties: lower item id first); rank r (0-based) is head when r < cuts[0] * n,
    mid when r < cuts[1] * n, else tail."""
    n = popularity.numel()
    ids = torch.arange(n, device=popularity.device)
    # stable sort on -popularity keeps the id order within ties
    order = torch.sort(-popularity.to(torch.float64), stable=True).indices
    rank = torch.empty_like(ids)
    rank[order] = ids
    groups = torch.full((n,), TAIL, dtype=torch.long, device=popularity.device)
    groups[rank < cuts[1] * n] = MID
    groups[rank < cuts[0] * n] = HEAD
    return groups


def sum_keys(spec: EvalSpec) -> tuple[str, ...]:
    """The names of a pass's sums: the per-user metrics, the group recalls and their user counts, the
    item-count vectors."""
    keys = [m for m in spec.names]
    if GROUPED in spec.metrics:
        keys += [USERS_KEY.format(k=k, g=g) for k in spec.topk for g in GROUPS]
    if any(m in spec.metrics for m in CATALOGUE):
        keys += [ITEMS_KEY.format(k=k) for k in spec.topk]
    return tuple(k for k in keys if not k.startswith(CATALOGUE))


def zero_sums(spec: EvalSpec, n_items: int, device) -> dict[str, torch.Tensor]:
    """A pass's sums, zero: float64 scalars, item-count vectors of length ``n_items``."""
    return {k: torch.zeros(n_items if k.startswith("_items@") else (), dtype=torch.float64, device=device)
            for k in sum_keys(spec)}


def batch_sums(scores: torch.Tensor, batch: dict[str, torch.Tensor], spec: EvalSpec,
               groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One block's contribution to each sum of :func:`zero_sums`, from full-ranking ``scores``
    [B, n_items] (masked in place). ``groups``: :func:`popularity_groups` of ``batch["item_pop"]``,
    needed by ``recall_groups`` and ``tail_percentage``."""
    ks, n_items = spec.topk, scores.shape[1]
    topk = masked_topk(scores, batch["mask_rows"], batch["mask_cols"], max(ks), batch.get("exclude_items")).indices
    hits = hits_at(topk, batch["pos_keys"], n_items)
    per_user = recall_ndcg(hits, batch["n_pos"], ks) if {"recall", "ndcg"} & set(spec.metrics) else {}
    per_user.update(more_per_user(hits, batch["n_pos"], topk, spec, batch.get("item_pop"), groups))
    out = {m: per_user[m].sum() for m in spec.names if m in per_user}
    if GROUPED in spec.metrics:
        out.update(group_recall_sums(hits, topk, batch["pos_keys"], n_items, ks, groups))
    if any(m in spec.metrics for m in CATALOGUE):
        for k in ks:
            out[ITEMS_KEY.format(k=k)] = torch.bincount(topk[:, :k].reshape(-1), minlength=n_items).to(torch.float64)
    return out


def more_per_user(hits: torch.Tensor, n_pos: torch.Tensor, topk: torch.Tensor, spec: EvalSpec,
                  popularity: torch.Tensor | None, groups: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-user precision, hit, map, avg_popularity and tail_percentage @K (those ``spec`` asks for)."""
    wanted = set(spec.metrics)
    h = hits.to(torch.float64)
    n_pos = n_pos.to(h.device)
    ranks = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float64)
    out = {}
    if "map" in wanted:
        precision_at = torch.cumsum(h, 1) / ranks  # P@j for every j
        ap_sum = torch.cumsum(precision_at * h, 1)
    if "avg_popularity" in wanted:
        if popularity is None:
            raise ValueError("avg_popularity needs the items' training popularity (batch['item_pop'])")
        pop = popularity.to(torch.float64)[topk]
    if "tail_percentage" in wanted:
        if groups is None:
            raise ValueError("tail_percentage needs the popularity groups (batch['item_pop'])")
        tail = (groups[topk] == TAIL).to(torch.float64)
    for k in spec.topk:
        kk = min(k, h.shape[1])
        if "precision" in wanted:
            out[f"precision@{k}"] = h[:, :kk].sum(1) / k
        if "hit" in wanted:
            out[f"hit@{k}"] = (h[:, :kk].sum(1) > 0).to(torch.float64)
        if "map" in wanted:
            out[f"map@{k}"] = ap_sum[:, kk - 1] / n_pos.clamp(min=1, max=k)
        if "avg_popularity" in wanted:
            out[f"avg_popularity@{k}"] = pop[:, :kk].sum(1) / kk
        if "tail_percentage" in wanted:
            out[f"tail_percentage@{k}"] = tail[:, :kk].sum(1) / kk
    return out


def group_recall_sums(hits: torch.Tensor, topk: torch.Tensor, pos_keys: torch.Tensor, n_items: int, ks,
                      groups: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per group g and K: the sum over users of hits@K among their held-out items of g / the number of
    those items (users without held-out items of g add 0), and the number of users who have some."""
    if groups is None:
        raise ValueError("recall_groups needs the popularity groups (batch['item_pop'])")
    n_users = topk.shape[0]
    pos_rows, pos_items = pos_keys // n_items, pos_keys % n_items
    n_pos = torch.bincount(pos_rows * 3 + groups[pos_items], minlength=n_users * 3).view(n_users, 3).to(torch.float64)
    hit_group = groups[topk]
    out = {}
    for k in ks:
        kk = min(k, topk.shape[1])
        for g, name in enumerate(GROUPS):
            hits_g = (hits[:, :kk] & (hit_group[:, :kk] == g)).sum(1).to(torch.float64)
            has = n_pos[:, g] > 0
            out[f"recall@{k}_{name}"] = (hits_g[has] / n_pos[has, g]).sum()
            out[USERS_KEY.format(k=k, g=name)] = has.sum().to(torch.float64)
    return out


def gini_index(counts: torch.Tensor) -> torch.Tensor:
    """Gini index of ``counts`` over all items (zeros included): sum_i (2i - n - 1) c_(i) / (n sum c),
    c ascending, i = 1..n; 0 when nothing was counted."""
    n = counts.numel()
    c = torch.sort(counts.to(torch.float64)).values
    i = torch.arange(1, n + 1, device=c.device, dtype=torch.float64)
    total = c.sum()
    return ((2 * i - n - 1) * c).sum() / (n * total) if float(total) > 0 else total


def finalize(sums: dict[str, torch.Tensor], count: int, spec: EvalSpec) -> dict[str, torch.Tensor]:
    """The metrics of ``spec`` (in ``spec.names`` order, float64) from a pass's sums over ``count`` users."""
    out = {}
    for m in spec.names:
        head, _, at = m.partition("@")
        if head == "coverage":
            items = sums[ITEMS_KEY.format(k=at)]
            out[m] = (items > 0).sum().to(torch.float64) / items.numel()
        elif head == "gini":
            out[m] = gini_index(sums[ITEMS_KEY.format(k=at)])
        elif "_" in at:  # recall@K_<group>
            k, _, g = at.partition("_")
            out[m] = sums[m] / sums[USERS_KEY.format(k=k, g=g)].clamp(min=1)
        else:
            out[m] = sums[m] / max(count, 1)
    return out
