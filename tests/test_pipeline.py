"""Texts, negative sampling, config checks and the reason/graph stages run in-process (no encoder)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_graph import dense_cosine, dense_reference

from conftest import llm_settings
from mllmrec import config as mconfig
from mllmrec.cache import ArtifactCache
from mllmrec.data import TRAIN
from mllmrec.datamodule import sample_negatives
from mllmrec.errors import ConfigError
from mllmrec.texts import item_texts


# ---------------------------------------------------------------- texts
def test_item_texts_join_fields_with_spaces(tiny_data):
    texts = item_texts(tiny_data)
    assert len(texts) == tiny_data.n_items
    assert texts[0] == "Glass Baby Bottle 8oz Evenflo Baby, Feeding, Bottles Heat resistant glass bottle with a slow flow nipple."
    # unescaped HTML and flattened categories
    assert texts[12] == "Baby Bee Shampoo & Wash Burt's Bees Baby, Bathing & Skin Care, Gifts Tear free, 98.9% natural formula."
    # an empty field (item 11 has no brand) leaves no double space
    assert texts[11] == "Cloth Diaper Inserts Pack Baby, Diapering, Cloth Diapers Five layer bamboo inserts, machine washable."
    assert not any("  " in t for t in texts)


def test_item_texts_append_image_descriptions(tiny_data):
    descriptions = [""] * tiny_data.n_items
    descriptions[2] = "A set of green bamboo spoons."
    texts = item_texts(tiny_data, descriptions)
    assert texts[2] == item_texts(tiny_data)[2] + " A set of green bamboo spoons."
    assert texts[3] == item_texts(tiny_data)[3]
    with pytest.raises(ValueError):
        item_texts(tiny_data, ["x"])


# ---------------------------------------------------------------- negative sampling
def _train_keys(data) -> torch.Tensor:
    u, i = data.pairs(TRAIN)
    return torch.sort(torch.as_tensor(u * data.n_items + i, dtype=torch.long)).values


def test_negatives_are_never_training_items(tiny_data):
    keys = _train_keys(tiny_data)
    train = tiny_data.train_matrix.toarray() > 0
    users = torch.arange(tiny_data.n_users).repeat(250)  # 10,000 draws
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        neg = sample_negatives(users, keys, tiny_data.n_items, gen)
        assert neg.shape == users.shape and neg.dtype == torch.long
        assert int(neg.min()) >= 0 and int(neg.max()) < tiny_data.n_items
        assert not train[users.numpy(), neg.numpy()].any()


def test_negatives_are_uniform_over_non_training_items(tiny_data):
    keys = _train_keys(tiny_data)
    u = 0
    train_items = set(tiny_data.history("train")[u].tolist())
    allowed = sorted(set(range(tiny_data.n_items)) - train_items)
    n = 20_000
    neg = sample_negatives(torch.full((n,), u), keys, tiny_data.n_items, torch.Generator().manual_seed(1))
    counts = np.bincount(neg.numpy(), minlength=tiny_data.n_items)
    assert set(np.flatnonzero(counts)) == set(allowed)  # every allowed item is drawn, nothing else
    expected = n / len(allowed)
    assert np.all(np.abs(counts[allowed] - expected) < 0.2 * expected)


def test_negative_sampling_is_deterministic_for_a_seeded_generator(tiny_data):
    keys = _train_keys(tiny_data)
    users = torch.arange(tiny_data.n_users).repeat(20)
    a = sample_negatives(users, keys, tiny_data.n_items, torch.Generator().manual_seed(42))
    b = sample_negatives(users, keys, tiny_data.n_items, torch.Generator().manual_seed(42))
    c = sample_negatives(users, keys, tiny_data.n_items, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_negative_sampling_fails_when_a_user_has_every_item():
    n_items = 4
    keys = torch.arange(n_items)  # user 0 interacted with items 0..3
    with pytest.raises(RuntimeError, match="did not converge"):
        sample_negatives(torch.zeros(3, dtype=torch.long), keys, n_items, torch.Generator().manual_seed(0), max_rounds=20)


# ---------------------------------------------------------------- config and stages in-process
def test_composed_config_points_at_the_fixture(compose_cfg, tiny_dir, tmp_path):
    cfg = compose_cfg()
    assert cfg.dataset.name == "tiny" and cfg.dataset.data_dir == str(tiny_dir)
    assert cfg.paths.cache_dir == f"{tmp_path / 'outputs'}/cache"
    assert (cfg.graph.k_s, cfg.graph.alpha, cfg.graph.k_c, cfg.graph.layers) == (10, 0.7, 10, 1)
    assert cfg.reason.history == "train" and cfg.seed == 999
    mconfig.validate(cfg)  # defaults are valid


@pytest.mark.parametrize(
    "override,key",
    [("graph.alpha=1.5", "graph.alpha"), ("graph.k_c=0", "graph.k_c"), ("graph.layers=-1", "graph.layers"),
     ("reason.history=everything", "reason.history"), ("model.optimizer.lr=0", "model.optimizer.lr")],
)
def test_out_of_range_settings_are_refused_by_key(compose_cfg, override, key):
    with pytest.raises(ConfigError) as ei:
        mconfig.validate(compose_cfg(override))
    assert f"config '{key}'" in str(ei.value) and "\n" not in str(ei.value)


# Read by hand from tests/fixtures/tiny: user 0's rows are items 22, 0, 2, 4, 15, 5 (train),
# 11 (valid), 3 (test); user 1's are 21, 24, 18, 6 (train), 11 (valid), 9 (test).
TITLES = {0: "Glass Baby Bottle 8oz", 2: "Bamboo Toddler Spoons Set", 3: "Spill Proof Sippy Cup",
          4: "Formula Dispenser Tower", 5: "Bottle Drying Rack Lawn", 6: "Overnight Diapers Size 3",
          9: "Portable Changing Pad", 11: "Cloth Diaper Inserts Pack", 15: "Bath Thermometer Duck",
          18: "Wooden Stacking Rings", 21: "Teething Ring Giraffe", 22: "Shape Sorter Cube",
          24: "Video Baby Monitor"}
HISTORY = {0: ([22, 0, 2, 4, 15, 5], [11, 3]), 1: ([21, 24, 18, 6], [11, 9])}


def _expected_text(user: int, history: str) -> str:
    train, heldout = HISTORY[user]
    return "; ".join(TITLES[i] for i in train + (heldout if history == "all" else []))


def _heldout_titles_from_the_file(tiny_dir) -> dict[int, set[str]]:
    """Per user, the titles of its valid/test rows, read with the csv module (not the loader)."""
    import csv
    import html

    with open(tiny_dir / "meta-tiny.csv", newline="") as f:
        titles = {int(r["itemID"]): html.unescape(r["title"]) for r in csv.DictReader(f)}
    out: dict[int, set[str]] = {}
    with open(tiny_dir / "tiny.inter", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["x_label"] != "0":
                out.setdefault(int(r["userID"]), set()).add(titles[int(r["itemID"])])
    return out


def test_reason_stage_writes_train_title_lists(compose_cfg, tiny_data, tiny_dir, caplog):
    from mllmrec.stages import reason

    cfg = compose_cfg()
    cache = ArtifactCache(cfg.paths.cache_dir, "tiny")
    art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
    assert art.reused is False
    texts = reason.load_texts(art)
    assert len(texts) == tiny_data.n_users == art.manifest["counts"]["users"]
    assert texts[0] == _expected_text(0, "train") and texts[1] == _expected_text(1, "train")
    heldout = _heldout_titles_from_the_file(tiny_dir)
    assert len(heldout) == tiny_data.n_users
    for u, titles in heldout.items():  # titles are unique in the fixture: no held-out title may appear
        assert texts[u] and not any(t in texts[u] for t in titles), u
    assert reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache).reused is True

    with caplog.at_level(logging.WARNING):
        leaky = reason.run(compose_cfg("reason.history=all").reason, llm_settings(cfg), tiny_data, cache)
    assert leaky.key != art.key
    leaky_texts = reason.load_texts(leaky)
    assert leaky_texts[0] == _expected_text(0, "all") and leaky_texts[1] == _expected_text(1, "all")
    for u, titles in heldout.items():
        assert all(t in leaky_texts[u] for t in titles), u
    assert any("leak" in r.getMessage() for r in caplog.records)


def test_graph_stage_matches_the_dense_reference_and_reuses_pieces(compose_cfg, tiny_data):
    from mllmrec.stages import graph

    rng = np.random.default_rng(5)
    features = rng.standard_normal((tiny_data.n_items, 16)).astype(np.float32)
    cfg = compose_cfg("graph.alpha=0.2", "graph.k_c=5", "graph.k_s=6", "graph.layers=2")
    cache = ArtifactCache(cfg.paths.cache_dir, "tiny")
    art = graph.run(cfg.graph, tiny_data, cache, features, "fake-features-key")

    # expectation: the dense float64 implementation of Eq. 6-12 in test_graph (not the library)
    sim = dense_cosine(features)
    assert np.diff(np.sort(sim, axis=1), axis=1).min() > 1e-6 and np.abs(sim - 0.2).min() > 1e-5  # no near ties
    ref_adj, ref_star = dense_reference(features, tiny_data.train_matrix.toarray(), 6, 0.2, 5, 2)
    np.testing.assert_allclose(graph.load_item_star(art), ref_star, rtol=1e-5, atol=1e-5)
    saved = sp.load_npz(art.file(graph.ADJACENCY))
    np.testing.assert_allclose(saved.toarray(), ref_adj, rtol=1e-6, atol=1e-7)
    counts = art.manifest["counts"]
    assert counts["items"] == tiny_data.n_items and counts["edges"] == np.count_nonzero(ref_adj)

    # another alpha: the kNN and co-occurrence pieces are reused, only the final graph is rebuilt
    root = cache.root / "tiny"
    before = {stage: sorted(p.name for p in (root / stage).iterdir() if not p.name.startswith(".")) for stage in ("graph-knn", "graph-cooc")}
    other = graph.run(compose_cfg("graph.alpha=0.5", "graph.k_c=5", "graph.k_s=6", "graph.layers=2").graph,
                      tiny_data, cache, features, "fake-features-key")
    assert other.key != art.key and other.reused is False
    after = {stage: sorted(p.name for p in (root / stage).iterdir() if not p.name.startswith(".")) for stage in ("graph-knn", "graph-cooc")}
    assert before == after and all(len(v) == 1 for v in after.values())
    assert other.manifest["counts"]["knn_edges_kept"] < counts["knn_edges_kept"]

    # "w/o TE": no co-occurrence graph at all
    no_te = graph.run(compose_cfg("graph.enhance=false").graph, tiny_data, cache, features, "fake-features-key")
    assert no_te.manifest["counts"]["cooc_edges"] == 0
    assert no_te.manifest["inputs"]["cooc"] == "none"
