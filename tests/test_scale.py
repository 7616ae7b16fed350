"""The scale benchmark's harness on a tiny synthetic size (not timed), and the mends it needed:
co-occurrence chunked by work, the kNN top-k selection, FAISS IVF candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from mllmrec.bench import scale, scale_pieces
from mllmrec.bench.synthetic import SyntheticSpec, generate
from mllmrec.item_graph import _topk_rows_np, cooccurrence_chunks, cooccurrence_topk, knn_candidates

SPEC = SyntheticSpec(users=300, items=200, interactions=3600, seed=1, feature_dim=16, topics=6)


# ---------------------------------------------------------------------------- mends
def _dense_jaccard_topk(train: np.ndarray, k: int) -> dict:
    """Independent reference: dense Jaccard, diagonal out, top-k per row (ties: smaller column)."""
    a = (train > 0).astype(np.float64)
    inter = a.T @ a
    deg = a.sum(0)
    union = deg[:, None] + deg[None, :] - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    np.fill_diagonal(jac, 0.0)
    out = {}
    for r in range(jac.shape[0]):
        order = np.lexsort((np.arange(jac.shape[1]), -jac[r]))[:k]
        for c in order:
            if jac[r, c] > 0:
                out[(r, int(c))] = jac[r, c]
    return out


@pytest.mark.parametrize("max_products", [1, 50, 1 << 23])
def test_cooccurrence_chunked_by_work_matches_dense(max_products):
    rng = np.random.default_rng(0)
    train = (rng.random((60, 40)) < 0.15).astype(np.float32)
    train[:, 0] = 1.0  # one item everybody has: its row of R^T R is dense
    got = cooccurrence_topk(sp.csr_matrix(train), 3, chunk_size=7, progress=False, max_products=max_products).tocoo()
    ref = _dense_jaccard_topk(train, 3)
    assert {(int(r), int(c)) for r, c in zip(got.row, got.col)} == set(ref)
    for r, c, v in zip(got.row, got.col, got.data):
        assert v == pytest.approx(ref[(int(r), int(c))], rel=1e-6)


def test_cooccurrence_chunks_respect_the_work_budget():
    rng = np.random.default_rng(1)
    train = sp.csr_matrix((rng.random((200, 50)) < 0.1).astype(np.float32))
    items_users = sp.csr_matrix(train.T)
    user_degree = np.diff(train.indptr).astype(np.float64)
    work = np.array([user_degree[items_users.indices[items_users.indptr[a]:items_users.indptr[a + 1]]].sum()
                     for a in range(50)])
    chunks = cooccurrence_chunks(items_users, user_degree, max_rows=8, max_products=40)
    assert chunks[0][0] == 0 and chunks[-1][1] == 50
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, every row once
    for start, stop in chunks:
        assert stop - start <= 8
        assert stop - start == 1 or work[start:stop].sum() <= 40


def test_topk_selection_ties_smaller_column_first():
    """The torch.topk selection keeps the tie rule: k largest, ties by smaller column, sorted by value."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        sim = np.round(rng.standard_normal((20, 60)), 1).astype(np.float32)  # many ties
        for k in (1, 4, 9):
            cols, vals = _topk_rows_np(sim.copy(), k)
            for r in range(sim.shape[0]):
                ref = np.lexsort((np.arange(sim.shape[1]), -sim[r]))[:k]
                assert list(cols[r]) == list(ref)
                assert np.array_equal(vals[r], sim[r, ref])


def test_knn_ivf_recall_against_exact_and_self_first():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((20, 24))
    feats = (centers[rng.integers(20, size=3000)] + 0.3 * rng.standard_normal((3000, 24))).astype(np.float32)
    exact_idx, _ = knn_candidates(feats, 10, progress=False)
    idx, sim = knn_candidates(feats, 10, progress=False, method="ivf", nprobe=8)
    assert idx.shape == (3000, 10) and np.array_equal(idx[:, 0], np.arange(3000))
    assert np.allclose(sim[:, 0], 1.0, atol=1e-5)
    recall = np.mean([len(set(a[1:]) & set(b[1:])) / 9 for a, b in zip(idx, exact_idx)])
    assert recall > 0.9, recall
    with pytest.raises(ValueError, match="knn method"):
        knn_candidates(feats, 10, method="hnsw")


# ---------------------------------------------------------------------------- harness
def test_parse_size_and_bad_size():
    assert scale.parse_size("1000000x200000x13500000") == (1_000_000, 200_000, 13_500_000)
    from mllmrec.errors import ConfigError

    with pytest.raises(ConfigError, match="USERSxITEMSxINTERACTIONS"):
        scale.parse_size("1000x200")


def test_stages_in_process_on_a_tiny_size(tmp_path):
    """Every stage's piece, in this process (the harness runs each in a child), handing files on."""
    data_dir = tmp_path / "data"
    summary = generate(SPEC, data_dir, progress=False)
    work = tmp_path / "work"
    work.mkdir()
    common = {"work": str(work), "data_dir": str(data_dir), "seed": 0}
    load = scale_pieces.piece_load(name="synthetic", **common)
    assert load["train_interactions"] == summary["train"] and load["peak_rss_mb"] > 0
    feats = str(data_dir / "text_feat.npy")
    scale_pieces.piece_knn(features=feats, k_s=5, **common)
    cooc = scale_pieces.piece_cooccurrence(k_c=5, **common)
    assert cooc["edges"] > 0
    graph = scale_pieces.piece_graph(features=feats, alpha=0.2, layers=1, **common)
    assert (work / "e_star.npy").is_file() and graph["edges"] >= SPEC.items * 0.9
    epoch = scale_pieces.piece_epoch(model="mllmrec", budget_s=1e9, **common)
    assert not epoch["extrapolated"] and epoch["steps"] == epoch["steps_total"] and np.isfinite(epoch["loss"])
    ev = scale_pieces.piece_eval(model="mllmrec", budget_s=1e9, **common)
    assert ev["after_one_epoch"] and ev["users"] == ev["users_done"] > 0 and 0 <= ev["test/recall@20"] <= 1
    pop = scale_pieces.piece_pop(budget_s=1e9, **common)
    assert pop["users"] == ev["users"]
    # the popularity piece against an independent dense computation
    from mllmrec.data import TEST, load_dataset

    data = load_dataset("synthetic", data_dir)
    train = data.train_matrix.toarray() > 0
    held = data.split_matrix(TEST).toarray() > 0
    counts = train.sum(0)
    scores = np.where(train, -np.inf, counts - np.arange(data.n_items) / (2.0 * data.n_items))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    users = np.flatnonzero(held.any(1) & train.any(1))
    rec = (np.take_along_axis(held, top, 1).sum(1)[users] / held.sum(1)[users]).mean()
    assert pop["test/recall@20"] == pytest.approx(rec, abs=1e-9)


def test_epoch_budget_extrapolates(tmp_path):
    data_dir = tmp_path / "data"
    generate(SPEC, data_dir, progress=False)
    work = tmp_path / "work"
    work.mkdir()
    common = {"work": str(work), "data_dir": str(data_dir), "seed": 0}
    scale_pieces.piece_load(name="synthetic", **common)
    ep = scale_pieces.piece_epoch(model="lightgcn", budget_s=0.0, **common)
    assert ep["extrapolated"] and ep["steps"] == 1 < ep["steps_total"]
    assert ep["seconds"] == pytest.approx(ep["measured_seconds"] * ep["steps_total"], rel=1e-9)
    assert not (work / "lightgcn.pt").exists()  # an unfinished epoch leaves no weights for eval


def _rows():
    rows = []
    for n, (t, m) in {1000: (1.0, 100.0), 10_000: (10.0, 200.0), 100_000: (100.0, 400.0)}.items():
        rows.append({"users": n, "items": n, "interactions": n, "size": f"{n}x{n}x{n}", "n_users": n, "n_items": n,
                     "n_interactions": n, "train_interactions": n, "model": "mllmrec", "stage": "knn",
                     "seconds": t, "peak_rss_mb": m})
    rows.append({**rows[-1], "stage": "epoch", "seconds": None, "error": "killed by signal 9 (out of memory?)"})
    return rows


def test_slopes_table_and_plot(tmp_path):
    rows = _rows()
    slopes = scale.fitted_slopes(rows, "seconds")
    assert slopes[("mllmrec", "knn")] == pytest.approx(1.0)
    assert scale.fitted_slopes(rows, "peak_rss_mb")[("mllmrec", "knn")] == pytest.approx(np.log10(2), rel=1e-6)
    scale.save(rows, tmp_path)
    assert json.loads((tmp_path / "scale.json").read_text()) == rows
    md = (tmp_path / "scale.md").read_text()
    assert "killed by signal 9" in md and "| mllmrec | knn | 1.00 | - | 0.30 |" in md and "| CPU s |" in md
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_writes_scale_json(tmp_path):
    """The CLI as the checks call it: one tiny size, one cheap model (the graph stages run only with
    mllmrec; every stage's piece is tested in process above); each stage in its own process."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mllmrec.bench.scale", "sizes=[300x200x3600]", "models=[bpr]",
                           f"out={out}", "pop=false", "plot=false"], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "scale.json").read_text())
    assert {(r["model"], r["stage"]) for r in rows} == {("all", "load"), ("bpr", "build"), ("bpr", "epoch"),
                                                        ("bpr", "eval")}
    for r in rows:
        assert {"users", "items", "interactions", "model", "stage", "seconds", "peak_rss_mb"} <= set(r)
        assert (r["users"], r["items"], r["interactions"]) == (300, 200, 3600)
        assert "error" not in r and r["seconds"] >= 0 and r["peak_rss_mb"] > 0
    assert (out / "scale.md").is_file()
