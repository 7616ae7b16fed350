"""The losses the models share. Two forms of BPR, named for how they differ:

* :func:`bpr_logsigmoid`: ``-mean log sigmoid(y_ui - y_uj)`` computed exactly (``F.logsigmoid``), from
  the user, positive and negative representations (MLLMRec, and LATTICE, FREEDOM and LGMRec as
  MMRec writes them);
* :func:`bpr_sigmoid_eps`: ``-mean log(1e-10 + sigmoid(s_pos - s_neg))``, from the scores, MMRec's
  ``BPRLoss`` (``common/loss.py``) used by its BPR-MF, LightGCN and VBPR: the 1e-10 caps the loss
  of a badly ranked pair at 23 and changes the gradient there.

and :func:`emb_reg`, MMRec's ``EmbLoss`` (the L2 norms of the batch embeddings over the batch size), and
:func:`in_batch_info_nce`, the in-batch contrastive loss of the self-supervised models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_logsigmoid(h_u: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(y_ui - y_uj) with y = h_u . h_item."""
    return -F.logsigmoid((h_u * h_pos).sum(1) - (h_u * h_neg).sum(1)).mean()


def bpr_sigmoid_eps(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """-mean log(1e-10 + sigmoid(pos - neg)) over the scores of the positive and negative items."""
    return -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean()


def emb_reg(*embeddings: torch.Tensor) -> torch.Tensor:
    """MMRec's EmbLoss: sum of the L2 norms of the batch embeddings / batch size."""
    return sum(torch.linalg.vector_norm(e) for e in embeddings) / embeddings[-1].shape[0]


def in_batch_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, normalize: bool = True) -> torch.Tensor:
    """In-batch InfoNCE from ``a`` to ``b`` (one direction): row r of ``a`` against every row of ``b``, the
    positive is row r. ``-mean_r log( exp(s_rr/t) / sum_c exp(s_rc/t) )`` with s the cosine similarity
    (``normalize``) or the dot product. Repeated rows of the batch count as negatives, as in the official
    codes. Computed as a log-softmax (cross-entropy): the same value as exp-then-log, without overflow."""
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = (a / temperature) @ b.T  # the temperature on the B x d side, not on the B x B logits
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def info_nce_over_rows(a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`in_batch_info_nce` (cosine) of ``a_table[index]`` against ``b_table[index]``, computed on the
    DISTINCT rows of ``index`` with their multiplicities c: a row repeated in the batch is the same term
    repeated and the same negative repeated, so ``-mean_r log(exp(s_rr/t) / sum_j exp(s_rj/t))`` =
    ``sum_x c_x (logsumexp_y (s_xy/t + log c_y) - s_xx/t) / len(index)``: the same value and gradient,
    with (distinct / batch)^2 of the work."""
    ids, counts = torch.unique(index, return_counts=True)
    a = F.normalize(F.embedding(ids, a_table), dim=1) / temperature
    b = F.normalize(F.embedding(ids, b_table), dim=1)
    counts = counts.to(a.dtype)
    per_row = torch.logsumexp(a @ b.T + counts.log(), dim=1) - (a * b).sum(1)
    return (counts * per_row).sum() / index.shape[0]
