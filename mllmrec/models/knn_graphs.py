"""Item-item graphs of the multimodal baselines, sparse throughout (no |I| x |I| dense matrix).

* :func:`model_item_graph` builds a model's frozen modality kNN graph from its own cosine top-k
  candidates (:func:`mllmrec.item_graph.knn_candidates`, computed in row chunks), normalised
  D^-1/2 A D^-1/2. With ``refine`` it is the paper's plug-and-play refinement instead: the same
  candidates go through :func:`mllmrec.item_graph.refine_item_graph` (alpha threshold + Jaccard
  top-K_c co-occurrence), the one function MLLMRec itself uses.
* :func:`learned_knn_edges` is LATTICE's learned graph: the top-k neighbours are searched in
  chunks without gradient, then only the k similarities per row are recomputed with gradient.
* :class:`EdgeGraph` applies a sparse matrix given as (rows, cols, values) with autograd.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from mllmrec.item_graph import cooccurrence_topk, knn_candidates, refine_item_graph, sym_normalize


def weighted_knn(knn_idx: np.ndarray, knn_sim: np.ndarray) -> sp.csr_matrix:
    """The top-k graph with the similarities as edge weights (LATTICE's ``build_knn_neighbourhood``)."""
    n, k = knn_idx.shape
    return sp.csr_matrix((knn_sim.ravel().astype(np.float32), (np.repeat(np.arange(n), k), knn_idx.ravel())),
                         shape=(n, n))


def model_item_graph(features: np.ndarray, k: int, train_matrix: sp.spmatrix | None = None,
                     refine: dict | None = None, weighted: bool = False, knn: str = "exact") -> sp.csr_matrix:
    """A model's normalised modality item graph, from its own cosine top-k candidates.

    ``refine=None``: the model's own graph, binary (FREEDOM) or similarity-weighted (LATTICE),
    the item itself included as in their code. ``refine={alpha, k_c, denoise, enhance}``:
    ``refine_item_graph`` on the same candidates (MLLMRec's Eq. 7-10), then the same normalisation.
    """
    idx, sim = knn_candidates(features, k, progress=False, method=knn)
    if refine:
        cooc = None
        if refine.get("enhance", True):
            if train_matrix is None:
                raise ValueError("graph.refine with enhance needs the training interaction matrix")
            cooc = cooccurrence_topk(train_matrix, int(refine["k_c"]), progress=False)
        alpha = float(refine["alpha"]) if refine.get("denoise", True) else None
        adj = refine_item_graph(idx, sim, cooc, alpha)
    elif weighted:
        adj = weighted_knn(idx, sim)
    else:
        adj = refine_item_graph(idx, sim, None, None)  # every candidate, weight 1
    return sym_normalize(adj)


def refine_settings(refine: bool, alpha: float, k_c: int, denoise: bool, enhance: bool) -> dict | None:
    """The ``refine`` argument of :func:`model_item_graph`: the refinement settings when ``refine``
    (``graph.refine``) is on, else None."""
    return {"alpha": alpha, "k_c": k_c, "denoise": denoise, "enhance": enhance} if refine else None


@torch.no_grad()
def _topk_cols(feats_n: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = []
    for start in range(0, feats_n.shape[0], chunk):
        out.append(torch.topk(feats_n[start:start + chunk] @ feats_n.T, k, dim=1).indices)
    return torch.cat(out)


def learned_knn_edges(feats: torch.Tensor, k: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LATTICE's learned graph before normalisation: the top-k cosine neighbours of ``feats`` (the
    item itself included) with their similarities as weights; the values keep the gradient."""
    n = feats.shape[0]
    k = min(k, n)
    feats_n = F.normalize(feats, dim=1)
    cols = _topk_cols(feats_n.detach(), k, chunk).reshape(-1)
    rows = torch.arange(n, device=feats.device).repeat_interleave(k)
    return rows, cols, (F.embedding(rows, feats_n) * F.embedding(cols, feats_n)).sum(1)
