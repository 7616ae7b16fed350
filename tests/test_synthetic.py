"""The synthetic dataset generator (mllmrec/bench/synthetic.py) on a tiny size: same seed same bytes,
MMRec format that mllmrec loads, the 5-core, MMRec's split rule, long tails, and a real signal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllmrec.bench.synthetic import FILES, SyntheticSpec, activity, generate
from mllmrec.data import TEST, TRAIN, VALID, load_dataset
from mllmrec.errors import ConfigError
from mllmrec.models.modalities import load_feature_file

SPEC = SyntheticSpec(users=500, items=400, interactions=6000, seed=3, feature_dim=32, topics=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "a"
    summary = generate(SPEC, out, progress=False)
    return out, summary


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_data(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "b"
    generate(SPEC, again, progress=False)
    assert _files(out) == _files(again)
    other = tmp_path / "c"
    generate(SyntheticSpec(**{**SPEC.__dict__, "seed": 4}), other, progress=False)
    assert (other / "synthetic.inter").read_bytes() != (out / "synthetic.inter").read_bytes()


def test_loads_with_mllmrec_loader_and_features_fit(tiny):
    out, summary = tiny
    data = load_dataset("synthetic", out)
    assert (data.n_users, data.n_items, len(data.users)) == (summary["users"], summary["items"], summary["interactions"])
    assert np.array_equal(np.unique(data.users), np.arange(data.n_users))  # contiguous ids
    assert np.array_equal(np.unique(data.items), np.arange(data.n_items))
    assert int((data.split == TRAIN).sum()) == summary["train"]
    for key, n, row in (("text", data.n_items, "item"), ("image", data.n_items, "item"), ("users", data.n_users, "user")):
        feat = load_feature_file(out / FILES[key], n, row)
        assert feat.shape == (n, SPEC.feature_dim) and feat.dtype == np.float32
    assert json.loads((out / "synthetic.json").read_text())["spec"]["seed"] == SPEC.seed
    # asked counts are approached: the 5-core drops only a few of the least popular items
    assert summary["users"] >= 0.95 * SPEC.users and summary["items"] >= 0.8 * SPEC.items


def test_five_core_and_mmrec_split_rule(tiny):
    out, _ = tiny
    data = load_dataset("synthetic", out)
    assert np.bincount(data.users).min() >= 5
    assert np.bincount(data.items).min() >= 5
    n = np.bincount(data.users)
    held = np.where(n < 10, 2, n // 5)
    valid = np.bincount(data.users[data.split == VALID], minlength=data.n_users)
    test = np.bincount(data.users[data.split == TEST], minlength=data.n_users)
    assert np.array_equal(valid + test, held)
    assert np.array_equal(valid, held // 2)
    # no duplicate (user, item) rows
    assert len(np.unique(data.users * data.n_items + data.items)) == len(data.users)


def test_long_tails(tiny):
    out, _ = tiny
    data = load_dataset("synthetic", out)
    item_counts = np.sort(np.bincount(data.items))[::-1]
    top = item_counts[: len(item_counts) // 5].sum() / item_counts.sum()
    assert top > 0.35  # top 20% of items hold well over 20% of the interactions
    user_counts = np.sort(np.bincount(data.users))[::-1]
    assert user_counts[0] >= 3 * np.median(user_counts)


def test_activity_sums_exactly_and_respects_cap():
    spec = SyntheticSpec(users=1000, items=300, interactions=12_345, user_zipf=1.5)
    n_u = activity(spec, np.random.default_rng(0))
    assert n_u.sum() == 12_345 and n_u.min() >= 5 and n_u.max() <= 30


def test_signal_is_real_features_beat_popularity(tiny):
    """score = log(popularity) + g * cos(user feature, item feature), g chosen on VALIDATION (g = 0 is
    the popularity ranking itself): test Recall@20 clearly above the popularity ranking's."""
    out, _ = tiny
    data = load_dataset("synthetic", out)
    users = np.load(out / FILES["users"]).astype(np.float64)
    items = np.load(out / FILES["text"]).astype(np.float64)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    train = data.train_matrix.toarray() > 0  # tiny: dense is fine in a test
    log_pop = np.log(train.sum(0) + 1.0)
    cos = users @ items.T

    def recall(g, split):
        held = data.split_matrix(split).toarray() > 0
        scores = np.where(train, -np.inf, log_pop + g * cos)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :20]
        hits = np.take_along_axis(held, top, 1).sum(1)
        has = held.sum(1) > 0
        return float((hits[has] / held.sum(1)[has]).mean())

    g = max((0.0, 1.0, 2.0, 5.0, 10.0), key=lambda g: recall(g, VALID))
    assert g > 0
    assert recall(g, TEST) > recall(0.0, TEST) + 0.05, (g, recall(g, TEST), recall(0.0, TEST))


def test_bad_sizes_are_one_line_errors_and_write_nothing(tmp_path):
    with pytest.raises(ConfigError, match="interactions"):
        generate(SyntheticSpec(users=100, items=50, interactions=100), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="items"):
        generate(SyntheticSpec(users=10, items=5, interactions=100), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
