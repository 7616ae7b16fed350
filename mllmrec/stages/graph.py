"""Graph stage (SPEC steps 6-12): refined item-item graph and the propagated item features E*.

Three cached pieces, so that a grid over alpha x K_c recomputes only what depends on each value:
``graph-knn`` (top-K_s cosine candidates: depends on the features and K_s), ``graph-cooc``
(top-K_c Jaccard co-occurrence: depends on the training interactions and K_c) and ``graph``
(alpha threshold, S* = S~ + C~, normalisation, E* = sum of L propagation layers, computed once).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from mllmrec.cache import Artifact, ArtifactCache
from mllmrec.data import RecData
from mllmrec.item_graph import cooccurrence_topk, knn_candidates, propagate, refine_item_graph, sym_normalize

log = logging.getLogger(__name__)

STAGE = "graph"
ITEM_STAR = "item_star.npy"
ADJACENCY = "adjacency.npz"


def run(g, data: RecData, cache: ArtifactCache, features: np.ndarray, features_key: str) -> Artifact:
    """``g``: the ``graph`` node; ``features``: the item embeddings e_i (the encode artifact
    ``features_key``)."""
    method = str(g.get("knn", "exact"))
    knn = cache.fetch(
        "graph-knn",
        {"k_s": int(g.k_s), **({"knn": method} if method != "exact" else {})},
        {"features": features_key},
        lambda out: _build_knn(out, features, int(g.k_s), _device(g.get("device", "auto")), method),
    )
    cooc = None
    if g.enhance:
        cooc = cache.fetch(
            "graph-cooc",
            {"k_c": int(g.k_c)},
            {"train": data.train_fingerprint},
            lambda out: _build_cooc(out, data, int(g.k_c)),
        )
    alpha = float(g.alpha) if g.denoise else None
    config = {"alpha": alpha, "denoise": bool(g.denoise), "enhance": bool(g.enhance), "layers": int(g.layers)}
    inputs = {"features": features_key, "knn": knn.key, "cooc": cooc.key if cooc else "none"}

    def build(out):
        idx, sim = np.load(knn.file("knn_idx.npy")), np.load(knn.file("knn_sim.npy"))
        c = sp.load_npz(cooc.file("cooc.npz")) if cooc else None
        adj = refine_item_graph(idx, sim, c, alpha)
        e_star = propagate(sym_normalize(adj), features, int(g.layers))
        sp.save_npz(out / ADJACENCY, adj)
        np.save(out / ITEM_STAR, e_star)
        n = adj.shape[0]
        knn_edges = int((sim >= alpha).sum()) if alpha is not None else int(sim.size)
        return {
            "items": n,
            "edges": int(adj.nnz),
            "knn_edges_kept": knn_edges,
            "knn_candidates": int(sim.size),
            "cooc_edges": int(c.nnz) if c is not None else 0,
            "mean_degree": float(adj.nnz / max(n, 1)),
            "isolated_items": int((np.diff(adj.indptr) == 0).sum()),
        }

    art = cache.fetch(STAGE, config, inputs, build)
    c = art.manifest["counts"]
    log.info(
        "graph: %d edges (%d of %d kNN candidates kept at alpha=%s, %d co-occurrence), mean degree %.1f",
        c["edges"], c["knn_edges_kept"], c["knn_candidates"], alpha, c["cooc_edges"], c["mean_degree"],
    )
    return art


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _build_knn(out, features, k_s, device, method="exact"):
    idx, sim = knn_candidates(features, k_s, device=device, method=method)
    np.save(out / "knn_idx.npy", idx.astype(np.int32))
    np.save(out / "knn_sim.npy", sim)
    return {"items": int(idx.shape[0]), "k": int(idx.shape[1])}


def _build_cooc(out, data, k_c):
    c = cooccurrence_topk(data.train_matrix, k_c)
    sp.save_npz(out / "cooc.npz", c)
    return {"items": int(c.shape[0]), "edges": int(c.nnz)}


def load_item_star(artifact: Artifact) -> np.ndarray:
    return np.load(artifact.file(ITEM_STAR))
