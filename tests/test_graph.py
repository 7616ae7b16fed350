"""mllmrec.item_graph against an independent dense numpy implementation of SPEC Eq. 6-12."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mllmrec.item_graph import (
    cooccurrence_topk,
    denoised_knn,
    knn_candidates,
    propagate,
    refine_item_graph,
    sym_normalize,
)

N_ITEMS, N_USERS, DIM = 40, 60, 6


# ---------------------------------------------------------------- dense reference (float64)
def dense_cosine(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def dense_knn_graph(sim: np.ndarray, k_s: int, alpha: float | None) -> np.ndarray:
    """Eq. 7: 1 where b is in the top-K_s of row a (the item itself included) and s_ab >= alpha."""
    n = sim.shape[0]
    out = np.zeros_like(sim)
    for a in range(n):
        top = np.argsort(-sim[a], kind="stable")[:k_s]
        for b in top:
            if alpha is None or sim[a, b] >= alpha:
                out[a, b] = 1.0
    return out


def dense_jaccard(train: np.ndarray) -> np.ndarray:
    """Eq. 8: |U_a & U_b| / |U_a | U_b| over the train user sets; diagonal excluded."""
    b = (train > 0).astype(np.float64)
    inter = b.T @ b
    deg = b.sum(0)
    union = deg[:, None] + deg[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        jac = np.where(union > 0, inter / union, 0.0)
    np.fill_diagonal(jac, 0.0)
    return jac


def dense_topk_rows(c: np.ndarray, k_c: int) -> np.ndarray:
    """Eq. 9: per row the top-K_c positive values with their weights; ties -> smaller column."""
    out = np.zeros_like(c)
    cols = np.arange(c.shape[1])
    for a in range(c.shape[0]):
        order = np.lexsort((cols, -c[a]))
        kept = [b for b in order if c[a, b] > 0][:k_c]
        out[a, kept] = c[a, kept]
    return out


def dense_reference(features, train, k_s, alpha, k_c, layers, enhance=True):
    s_tilde = dense_knn_graph(dense_cosine(features), k_s, alpha)
    c_tilde = dense_topk_rows(dense_jaccard(train), k_c) if enhance else np.zeros_like(s_tilde)
    s_star = s_tilde + c_tilde  # Eq. 10
    deg = s_star.sum(1)  # N_aa = sum_b S*_ab (row sums)
    inv = np.where(deg > 0, deg ** -0.5, 0.0)
    a_hat = inv[:, None] * s_star * inv[None, :]
    e = features.astype(np.float64)
    total = e.copy()
    for _ in range(layers):  # Eq. 11-12
        e = a_hat @ e
        total += e
    return s_star, total


# ---------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def features() -> np.ndarray:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    sim = dense_cosine(x)
    # the float32 library and the float64 reference must rank every row alike: no near ties
    row_gaps = np.diff(np.sort(sim, axis=1), axis=1)
    assert row_gaps.min() > 1e-6  # float32 cosine error is ~1e-7 at this dimension
    return x


@pytest.fixture(scope="module")
def train() -> sp.csr_matrix:
    rng = np.random.default_rng(12)
    m = (rng.random((N_USERS, N_ITEMS)) < 0.08).astype(np.float32)
    m[:, 5] = 0.0  # an item nobody trained on: no co-occurrence row or column
    assert (m.sum(0) >= 2).sum() > N_ITEMS // 2  # plenty of overlap, and Jaccard ties
    return sp.csr_matrix(m)


def _assert_alpha_margin(features, alpha):
    if alpha is None:
        return
    sim = dense_cosine(features)
    assert np.abs(sim - alpha).min() > 1e-5, "alpha too close to a similarity for a float32/float64 comparison"


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "alpha,k_s,k_c,layers,enhance",
    [
        (0.3, 10, 10, 1, True),  # paper-like defaults on a small graph
        (0.5, 5, 3, 2, True),
        (0.6, 8, 20, 0, True),  # layers=0: E* = E^(0)
        (None, 10, 5, 1, True),  # "w/o GD": no threshold
        (0.3, 10, 10, 1, False),  # "w/o TE": no co-occurrence
        (None, 4, 1, 3, False),
        (0.95, 10, 10, 2, True),  # threshold removes almost every kNN edge but the self-loops
    ],
)
def test_matches_dense_reference(features, train, alpha, k_s, k_c, layers, enhance):
    _assert_alpha_margin(features, alpha)
    ref_adj, ref_star = dense_reference(features, train.toarray(), k_s, alpha, k_c, layers, enhance)

    idx, sim = knn_candidates(features, k_s, progress=False)
    cooc = cooccurrence_topk(train, k_c, progress=False) if enhance else None
    adj = refine_item_graph(idx, sim, cooc, alpha)
    e_star = propagate(sym_normalize(adj), features, layers)

    assert isinstance(adj, sp.csr_matrix) and adj.shape == (N_ITEMS, N_ITEMS)
    np.testing.assert_allclose(adj.toarray(), ref_adj, rtol=1e-6, atol=1e-7)
    assert e_star.shape == features.shape and e_star.dtype == np.float32
    np.testing.assert_allclose(e_star, ref_star, rtol=1e-5, atol=1e-5)
    if layers == 0:
        np.testing.assert_array_equal(e_star, features)
    # every item keeps its self-loop (similarity 1 is the row maximum, >= any alpha <= 1)
    assert np.all(adj.diagonal() >= 1.0)


def test_knn_candidates_rows_sorted_and_self_first(features):
    idx, sim = knn_candidates(features, 10, progress=False)
    assert idx.shape == sim.shape == (N_ITEMS, 10)
    np.testing.assert_array_equal(idx[:, 0], np.arange(N_ITEMS))
    np.testing.assert_allclose(sim[:, 0], 1.0, atol=1e-6)
    assert np.all(np.diff(sim, axis=1) <= 0)
    # k_s larger than the number of items: every item is a candidate
    idx_all, _ = knn_candidates(features, N_ITEMS + 5, progress=False)
    assert idx_all.shape == (N_ITEMS, N_ITEMS)
    assert all(sorted(row) == list(range(N_ITEMS)) for row in idx_all.tolist())


def test_cooccurrence_excludes_diagonal_and_keeps_positive_topk(train):
    k_c = 4
    c = cooccurrence_topk(train, k_c, progress=False)
    ref = dense_topk_rows(dense_jaccard(train.toarray()), k_c)
    np.testing.assert_allclose(c.toarray(), ref, rtol=1e-6, atol=0)
    assert np.all(c.diagonal() == 0)
    assert np.all(c.data > 0) and np.all(c.data <= 1)
    assert np.diff(c.indptr).max() <= k_c
    assert c[5].nnz == 0 and c[:, 5].nnz == 0  # the item without train users


def test_cooccurrence_ties_break_to_smaller_column():
    # item 0: users {0, 1, 2, 3}; item b in 1..4: users {b - 1, 10 + b}. Row 0 holds four equal
    # Jaccard values 1 / (4 + 2 - 1) = 0.2; its top-2 must keep the smaller columns 1 and 2.
    m = np.zeros((15, 5), np.float32)
    m[[0, 1, 2, 3], 0] = 1
    for b in range(1, 5):
        m[[b - 1, 10 + b], b] = 1
    c = cooccurrence_topk(sp.csr_matrix(m), 2, progress=False).toarray()
    assert c[0].nonzero()[0].tolist() == [1, 2]
    np.testing.assert_allclose(c[0, [1, 2]], 0.2, rtol=1e-6)
    for b in range(1, 5):  # items 1..4 only co-occur with item 0
        assert c[b].nonzero()[0].tolist() == [0]
        assert c[b, 0] == pytest.approx(0.2)


def test_denoised_knn_threshold_is_binary():
    idx = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    sim = np.array([[1.0, 0.8, 0.2], [1.0, 0.8, 0.5], [1.0, 0.5, 0.2]], np.float32)
    s = denoised_knn(idx, sim, 0.5).toarray()
    np.testing.assert_array_equal(s, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])  # s >= alpha kept, weight 1
    np.testing.assert_array_equal(denoised_knn(idx, sim, None).toarray(), np.ones((3, 3)))


def test_sym_normalize_uses_row_sums_and_leaves_empty_rows_zero():
    adj = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], np.float32))  # not symmetric
    norm = sym_normalize(adj).toarray()
    inv = np.array([2 ** -0.5, 1.0, 0.0])  # row sums 2, 1, 0
    np.testing.assert_allclose(norm, inv[:, None] * adj.toarray() * inv[None, :], rtol=1e-6)
    assert np.all(norm[2] == 0) and np.isfinite(norm).all()


def test_knn_chunking_does_not_change_results(features):
    idx_a, sim_a = knn_candidates(features, 7, progress=False)
    idx_b, sim_b = knn_candidates(features, 7, chunk_size=3, progress=False)
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_allclose(sim_a, sim_b, rtol=0, atol=1e-6)


def test_cooccurrence_chunking_does_not_change_results(train):
    for k_c in (1, 5, 15):
        a = cooccurrence_topk(train, k_c, progress=False)
        b = cooccurrence_topk(train, k_c, chunk_size=7, progress=False)
        assert (a != b).nnz == 0
        np.testing.assert_array_equal(a.toarray(), b.toarray())


def test_knn_duplicate_features_keep_self_and_break_ties_by_index():
    x = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    dups = [1, 3, 7, 9]
    x[dups] = x[1]
    idx, _ = knn_candidates(x, 2, progress=False)
    for a in dups:
        expected_other = min(b for b in dups if b != a)
        assert idx[a].tolist() == [a, expected_other], (a, idx[a].tolist())
    adj = refine_item_graph(idx, np.ones_like(idx, dtype=np.float32), None, alpha=0.5)
    assert np.all(adj.diagonal() == 1.0)
