"""Full-ranking top-K metrics (MMRec protocol, SPEC section 1), vectorised over users.

Recall@K = hits in the top K / number of the user's held-out items.
NDCG@K  = DCG / ideal DCG, the ideal over min(#held-out, K) items; binary relevance.

:class:`EvalSpec` is ``conf/eval``: the cut-offs computed (``eval.topk``) and the validation metric
that selects (``eval.valid_metric``), checked once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from mllmrec.config import CONF_DIR
from mllmrec.errors import ConfigError


def metric_names(ks) -> tuple[str, ...]:
    """``recall@K`` for every K, then ``ndcg@K`` for every K."""
    return tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in ks)


def short_label(metric: str) -> str:
    """``val/recall@20`` -> ``R@20``, ``test/ndcg@10`` -> ``N@10`` (table and plot labels)."""
    name = metric.rpartition("/")[2]
    return {"recall": "R", "ndcg": "N"}.get(name.partition("@")[0], name.partition("@")[0]) + "@" + name.partition("@")[2]


@dataclass(frozen=True)
class EvalSpec:
    """What evaluation computes (``topk``) and what selects (``valid_metric``), from ``conf/eval``."""

    topk: tuple[int, ...]
    valid_metric: str

    @classmethod
    def from_config(cls, node=None) -> "EvalSpec":
        """``cfg.eval`` (a DictConfig, a dict or None) over ``conf/eval/default.yaml``, checked: a one-line
        ConfigError names the key."""
        merged = OmegaConf.merge(OmegaConf.load(CONF_DIR / "eval" / "default.yaml"), node or {})
        topk = merged.topk
        try:
            ks = tuple(sorted({int(k) for k in topk}))
            ok = bool(ks) and all(int(k) == k and k >= 1 for k in topk)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError("eval.topk", f"must be a non-empty list of integers >= 1, got {OmegaConf.to_container(merged)['topk']!r}")
        spec = cls(ks, str(merged.valid_metric))
        if spec.valid_metric not in spec.names:
            raise ConfigError("eval.valid_metric", f"{spec.valid_metric!r} is not computed: eval.topk={list(ks)} gives "
                              f"{', '.join(spec.names)}")
        return spec

    @classmethod
    def default(cls) -> "EvalSpec":
        return cls.from_config(None)

    @property
    def names(self) -> tuple[str, ...]:
        return metric_names(self.topk)

    @property
    def select(self) -> str:
        """The selecting metric as logged: ``val/<valid_metric>``."""
        return f"val/{self.valid_metric}"

    def columns(self, split: str) -> tuple[str, ...]:
        return tuple(f"{split}/{m}" for m in self.names)


def pairs_of_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(local row, column) of every stored entry of ``matrix[rows]``."""
    sub = matrix[rows].tocoo()
    return sub.row.astype(np.int64), sub.col.astype(np.int64)


def make_eval_batch(users: np.ndarray, train: sp.csr_matrix, heldout: sp.csr_matrix) -> dict[str, torch.Tensor]:
    """Everything one evaluation step needs for ``users``, as tensors (built once, reused every epoch)."""
    n_items = train.shape[1]
    mask_r, mask_c = pairs_of_rows(train, users)
    pos_r, pos_c = pairs_of_rows(heldout, users)
    return {
        "users": torch.as_tensor(users, dtype=torch.long),
        "mask_rows": torch.as_tensor(mask_r),
        "mask_cols": torch.as_tensor(mask_c),
        "pos_keys": torch.as_tensor(np.sort(pos_r * n_items + pos_c)),
        "n_pos": torch.as_tensor(np.bincount(pos_r, minlength=len(users)), dtype=torch.long),
    }


def sorted_contains(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Elementwise membership of ``query`` in the sorted 1-d tensor ``sorted_keys``."""
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=max(sorted_keys.numel() - 1, 0))
    return sorted_keys[pos] == query if sorted_keys.numel() else torch.zeros_like(query, dtype=torch.bool)


def masked_topk(scores: torch.Tensor, mask_rows: torch.Tensor, mask_cols: torch.Tensor, k: int):
    """The top-k (values, indices) per row after masking out the (row, col) pairs (training items),
    best first: the one mask-then-rank step of evaluation and of ``mllmrec.recommend``.

    ``scores`` is modified in place; masked entries score -inf.
    """
    scores.index_put_((mask_rows, mask_cols), torch.tensor(-torch.inf, device=scores.device, dtype=scores.dtype))
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
    topk = masked_topk(scores, batch["mask_rows"], batch["mask_cols"], max(ks)).indices
    hits = hits_at(topk, batch["pos_keys"], scores.shape[1])
    return recall_ndcg(hits, batch["n_pos"], ks)
