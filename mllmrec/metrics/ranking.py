"""Full-ranking top-K: the mask-then-rank step and Recall/NDCG (MMRec protocol, SPEC section 1),
vectorised over users.

Recall@K = hits in the top K / number of the user's held-out items.
NDCG@K  = DCG / ideal DCG, the ideal over min(#held-out, K) items; binary relevance.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def pairs_of_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(local row, column) of every stored entry of ``matrix[rows]``."""
    sub = matrix[rows].tocoo()
    return sub.row.astype(np.int64), sub.col.astype(np.int64)


def make_eval_batch(users: np.ndarray, train: sp.csr_matrix, heldout: sp.csr_matrix,
                    exclude_items: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Everything one evaluation step needs for ``users``, as tensors (built once, reused every epoch).

    ``exclude_items``: items that are no candidate for any of these users (e.g. the warm items when a
    cold-start split ranks its cold items only), masked like training items."""
    n_items = train.shape[1]
    mask_r, mask_c = pairs_of_rows(train, users)
    pos_r, pos_c = pairs_of_rows(heldout, users)
    batch = {
        "users": torch.as_tensor(users, dtype=torch.long),
        "mask_rows": torch.as_tensor(mask_r),
        "mask_cols": torch.as_tensor(mask_c),
        "pos_keys": torch.as_tensor(np.sort(pos_r * n_items + pos_c)),
        "n_pos": torch.as_tensor(np.bincount(pos_r, minlength=len(users)), dtype=torch.long),
    }
    if exclude_items is not None:
        batch["exclude_items"] = torch.as_tensor(np.asarray(exclude_items, dtype=np.int64))
    return batch


def sorted_contains(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Elementwise membership of ``query`` in the sorted 1-d tensor ``sorted_keys``."""
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=max(sorted_keys.numel() - 1, 0))
    return sorted_keys[pos] == query if sorted_keys.numel() else torch.zeros_like(query, dtype=torch.bool)


def masked_topk(scores: torch.Tensor, mask_rows: torch.Tensor, mask_cols: torch.Tensor, k: int,
                exclude_items: torch.Tensor | None = None):
    """The top-k (values, indices) per row after masking out the (row, col) pairs (training items)
    and, for every row, the ``exclude_items`` columns (no candidates), best first: the one
    mask-then-rank step of evaluation and of ``mllmrec.recommend``.

    ``scores`` is modified in place; masked entries score -inf.
    """
    minus_inf = torch.tensor(-torch.inf, device=scores.device, dtype=scores.dtype)
    scores.index_put_((mask_rows, mask_cols), minus_inf)
    if exclude_items is not None:
        scores[:, exclude_items] = minus_inf
    return torch.topk(scores, min(k, scores.shape[1]), dim=1)


def hits_at(topk: torch.Tensor, pos_keys: torch.Tensor, n_items: int) -> torch.Tensor:
    """Boolean [B, K]: is the item at each rank one of the user's held-out items."""
    rows = torch.arange(topk.shape[0], device=topk.device).unsqueeze(1)
    return sorted_contains(pos_keys, rows * n_items + topk)


def recall_ndcg(hits: torch.Tensor, n_pos: torch.Tensor, ks) -> dict[str, torch.Tensor]:
    """Per-user Recall@K and NDCG@K from the hit matrix (ranks sorted best first)."""
    hits = hits.to(torch.float64)
    max_k = hits.shape[1]
    discount = 1.0 / torch.log2(torch.arange(2, max_k + 2, device=hits.device, dtype=torch.float64))
    ideal_cum = torch.cumsum(discount, 0)
    n_pos = n_pos.to(hits.device)
    out = {}
    for k in ks:
        kk = min(k, max_k)
        h = hits[:, :kk]
        out[f"recall@{k}"] = h.sum(1) / n_pos.clamp(min=1)
        dcg = (h * discount[:kk]).sum(1)
        idcg = ideal_cum[(n_pos.clamp(min=1, max=kk) - 1)]
        out[f"ndcg@{k}"] = dcg / idcg
    return out


def evaluate_batch(scores: torch.Tensor, batch: dict[str, torch.Tensor], ks) -> dict[str, torch.Tensor]:
    """Per-user metrics for one evaluation batch of full-ranking scores [B, n_items] (masked in place)."""
    topk = masked_topk(scores, batch["mask_rows"], batch["mask_cols"], max(ks), batch.get("exclude_items")).indices
    hits = hits_at(topk, batch["pos_keys"], scores.shape[1])
    return recall_ndcg(hits, batch["n_pos"], ks)
