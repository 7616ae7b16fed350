"""dataset.split=cold_items (mllmrec/cold_start.py): the split's rule on the tiny fixture, the evaluation
candidates and training negatives it implies, the graph stage's co-occurrence built from training only
(cold items get kNN edges, never co-occurrence ones), and the one-line refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from mllmrec import cold_start
from mllmrec.cache import ArtifactCache
from mllmrec.data import TEST, TRAIN, VALID, RecData
from mllmrec.datamodule import RecDataModule, sample_negatives
from mllmrec.errors import ConfigError
from mllmrec.stages import graph


def cold(data, ratio=0.2, seed=0, split="cold_items"):
    return cold_start.apply(data, OmegaConf.create({"split": split, "cold_ratio": ratio, "cold_seed": seed}))


def test_the_split_rule(tiny_data):
    out = cold(tiny_data)
    n_cold = round(0.2 * tiny_data.n_items)
    valid_items, test_items = out.candidates[VALID], out.candidates[TEST]
    assert len(valid_items) + len(test_items) == n_cold and len(valid_items) == (n_cold + 1) // 2
    assert not set(valid_items) & set(test_items)
    cold_items = np.concatenate([valid_items, test_items])
    # no training interaction with a cold item; every interaction with one moved to its item's split
    assert not np.isin(out.items[out.split == TRAIN], cold_items).any()
    for code, items in ((VALID, valid_items), (TEST, test_items)):
        src = np.isin(tiny_data.items, items)
        assert sorted(zip(out.users[out.split == code], out.items[out.split == code])) == \
            sorted(zip(tiny_data.users[src], tiny_data.items[src]))
    # warm items: the file's training interactions as they were, their valid/test ones left out
    warm_train = (tiny_data.split == TRAIN) & ~np.isin(tiny_data.items, cold_items)
    assert np.array_equal(out.users[out.split == TRAIN], tiny_data.users[warm_train])
    assert np.array_equal(out.items[out.split == TRAIN], tiny_data.items[warm_train])
    assert out.n_items == tiny_data.n_items and out.n_users == tiny_data.n_users
    assert out.fingerprint != tiny_data.fingerprint and out.train_fingerprint != tiny_data.train_fingerprint
    # candidates: a split's cold items only; negatives: the warm items
    assert np.array_equal(np.setdiff1d(np.arange(out.n_items), out.non_candidates(TEST)), test_items)
    assert np.array_equal(out.negative_items(), np.setdiff1d(np.arange(out.n_items), cold_items))
    assert tiny_data.non_candidates(TEST) is None and tiny_data.negative_items() is None


def test_seeded_and_ratio(tiny_data):
    a, b, c = cold(tiny_data, seed=3), cold(tiny_data, seed=3), cold(tiny_data, seed=4)
    assert all(np.array_equal(a.candidates[s], b.candidates[s]) for s in (VALID, TEST))
    assert not np.array_equal(np.concatenate(list(a.candidates.values())), np.concatenate(list(c.candidates.values())))
    assert sum(len(v) for v in cold(tiny_data, ratio=0.5).candidates.values()) == 15
    assert cold(tiny_data, split="mmrec") is tiny_data


def test_users_left_without_training_are_counted_and_not_evaluated(caplog):
    # user 0's only training item is item 3; with items {3, ...} cold it has none left
    users = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    items = np.array([3, 1, 0, 1, 2, 0, 2, 3])
    split = np.array([0, 1, 0, 0, 1, 0, 0, 2], np.int8)
    data = RecData("toy", 3, 4, users, items, split)
    seed = next(s for s in range(100) if 3 in np.random.default_rng(s).permutation(4)[:2]
                and 1 not in np.random.default_rng(s).permutation(4)[:2])
    with caplog.at_level(logging.INFO, logger="mllmrec.cold_start"):
        out = cold(data, ratio=0.5, seed=seed)
    assert "left out of evaluation" in caplog.text
    dm = RecDataModule(eval_batch_size=8).attach(out)
    for code in (VALID, TEST):
        assert 0 not in dm.eval_users(code)
    import re

    n_valid, n_test = map(int, re.search(r"left out of evaluation: (\d+) in validation, (\d+) in test", caplog.text).groups())
    assert n_valid + n_test == 1  # user 0, whose item 3 is cold, in the split of item 3


def test_datamodule_ranks_cold_items_and_draws_warm_negatives(tiny_data):
    out = cold(tiny_data)
    dm = RecDataModule(eval_batch_size=16).attach(out)
    dm.setup()
    for name, code in (("valid", VALID), ("test", TEST)):
        for batch in dm.eval_batches[name]:
            assert np.array_equal(batch["exclude_items"].numpy(), out.non_candidates(code))
            assert batch["item_pop"].shape == (out.n_items,)
    assert set(dm.negative_pool.tolist()) == set(out.negative_items())
    gen = torch.Generator().manual_seed(0)
    neg = sample_negatives(dm.train_users.repeat(20), dm.train_keys, out.n_items, gen, pool=dm.negative_pool)
    assert not np.isin(neg.numpy(), np.concatenate(list(out.candidates.values()))).any()
    # the default split: no exclusion, no pool (the default run unchanged)
    dm0 = RecDataModule(eval_batch_size=16).attach(tiny_data)
    dm0.setup()
    assert dm0.negative_pool is None and "exclude_items" not in dm0.eval_batches["test"][0]


def test_cold_items_rank_among_cold_items_only(tiny_data):
    """A model scoring warm items highest still ranks the split's cold items (the rest masked)."""
    from mllmrec.metrics import EvalSpec, batch_sums, finalize, zero_sums

    out = cold(tiny_data)
    dm = RecDataModule(eval_batch_size=64).attach(out)
    dm.setup()
    spec = EvalSpec.from_config({"topk": [3], "valid_metric": "recall@3", "metrics": ["recall", "ndcg", "coverage"]})
    sums = zero_sums(spec, out.n_items, "cpu")
    for batch in dm.eval_batches["test"]:
        scores = torch.zeros(len(batch["users"]), out.n_items)
        scores[:, out.negative_items()] = 100.0  # warm items on top
        for m, v in batch_sums(scores, batch, spec).items():
            sums[m] += v
    result = finalize(sums, 1, spec)
    test_items = out.candidates[TEST]
    assert float(result["coverage@3"]) == pytest.approx(len(test_items) / out.n_items)  # only cold items recommended
    assert float(sums["_items@3"][out.negative_items()].sum()) == 0


def test_graph_stage_gives_cold_items_knn_edges_but_no_cooccurrence(tiny_data, tmp_path):
    out = cold(tiny_data, ratio=0.3)
    cold_items = np.concatenate(list(out.candidates.values()))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(out.n_items, 8)).astype(np.float32)
    g = OmegaConf.create({"k_s": 5, "alpha": -1.0, "k_c": 5, "layers": 1, "denoise": True, "enhance": True,
                          "device": "cpu"})
    cache = ArtifactCache(tmp_path / "cache", "tiny")
    art = graph.run(g, out, cache, features, "features-test")
    adj = sp.load_npz(art.file(graph.ADJACENCY)).tocsr()
    cooc = sp.load_npz(cache.root / "tiny" / "graph-cooc" / art.manifest["inputs"]["cooc"] / "cooc.npz").tocsr()
    # co-occurrence: no row or column of a cold item; the same stage on the full data does have some
    assert cooc[cold_items].nnz == 0 and cooc[:, cold_items].nnz == 0
    full = graph.run(g, tiny_data, ArtifactCache(tmp_path / "cache_full", "tiny"), features, "features-test")
    full_cooc = sp.load_npz(tmp_path / "cache_full" / "tiny" / "graph-cooc" / full.manifest["inputs"]["cooc"] / "cooc.npz")
    assert full_cooc.tocsr()[cold_items].nnz > 0
    # kNN: every cold item keeps its feature neighbours (alpha -1 keeps all candidates)
    knn_dir = cache.root / "tiny" / "graph-knn" / art.manifest["inputs"]["knn"]
    knn_idx = np.load(knn_dir / "knn_idx.npy")
    for i in cold_items:
        assert set(knn_idx[i]) - {i} <= set(adj[i].indices) | {i}
        assert set(adj[i].indices) - {i} <= set(knn_idx[i]) | {j for j in range(out.n_items) if i in knn_idx[j]}


@pytest.mark.parametrize("dataset,key", [
    ({"split": "cold_items", "cold_ratio": 1.0}, "dataset.cold_ratio"),
    ({"split": "cold_items", "cold_ratio": 0}, "dataset.cold_ratio"),
    ({"split": "cold_items", "cold_ratio": "x"}, "dataset.cold_ratio"),
    ({"split": "cold_items", "cold_seed": -1}, "dataset.cold_seed"),
    ({"split": "warm"}, "dataset.split"),
])
def test_bad_split_settings_are_one_line_errors(dataset, key):
    with pytest.raises(ConfigError) as err:
        cold_start.check(OmegaConf.create(dataset))
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_id_only_models_refuse_the_cold_split_and_feature_models_run():
    from hydra.utils import get_class

    ds = OmegaConf.create({"split": "cold_items", "cold_ratio": 0.2})
    for name, target in (("bpr", "mllmrec.models.bpr.BPRModule"), ("lightgcn", "mllmrec.models.lightgcn.LightGCNModule")):
        with pytest.raises(ConfigError, match="ID embedding only") as err:
            cold_start.check(ds, get_class(target), name)
        assert "\n" not in str(err.value)
    for name in cold_start.ID_PART:
        cls = get_class(OmegaConf.load(f"conf/model/{name}.yaml")._target_)
        cold_start.check(ds, cls, name)  # no error
        assert cls.needs in ("features", "modalities")
    cold_start.check(OmegaConf.create({"split": "mmrec"}), get_class("mllmrec.models.bpr.BPRModule"))


def test_cold_start_experiment_runs_every_model_that_can():
    """experiment=cold_start: MLLMRec first, then every conf/model whose class does not refuse the split."""
    import yaml
    from hydra.utils import get_class
    from model_zoo import MODEL_CONFS

    params = yaml.safe_load(open("conf/experiment/cold_start.yaml"))["hydra"]["sweeper"]["params"]
    models = [m.strip() for m in params["model"].split(",")]
    can = [m for m in MODEL_CONFS if get_class(OmegaConf.load(f"conf/model/{m}.yaml")._target_).needs != "ids"]
    assert models[0] == "mllmrec" and sorted(models) == sorted(can) == sorted(cold_start.ID_PART)
