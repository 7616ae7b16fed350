"""MLLMRec from released feature files (``dataset.item_features`` / ``dataset.user_features``, e.g. the
official Baby folder's ``image_text_feat.npy`` and ``user_preferences_feat.npy``): no describe, reason
or encode; the graph stage takes its item features from the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_module, tiny_overrides


@pytest.fixture
def released(tiny_data, tiny_copy):
    rng = np.random.default_rng(3)
    items = rng.standard_normal((tiny_data.n_items, 12)).astype(np.float32)
    users = rng.standard_normal((tiny_data.n_users, 12)).astype(np.float32)
    np.save(tiny_copy / "image_text_feat.npy", items)
    np.save(tiny_copy / "user_preferences_feat.npy", users)
    return tiny_copy, items, users


FILES = ["dataset.item_features=image_text_feat.npy", "dataset.user_features=user_preferences_feat.npy"]


def test_the_files_replace_describe_reason_encode(compose_cfg, released, tmp_path):
    from mllmrec.item_graph import cooccurrence_topk, knn_candidates, propagate, refine_item_graph, sym_normalize
    from mllmrec.pipeline import build_inputs

    data_dir, items, users = released
    cfg = compose_cfg(*FILES, f"paths.cache_dir={tmp_path / 'cache'}", data_dir=data_dir)
    inputs = build_inputs(cfg)
    assert set(inputs.artifacts) == {"graph"}  # no describe, reason or encode artifact
    np.testing.assert_array_equal(inputs.user_features, users)
    # E* of the file's item features, computed here from the same graph functions' definitions
    idx, sim = knn_candidates(items, int(cfg.graph.k_s), progress=False)
    cooc = cooccurrence_topk(inputs.data.train_matrix, int(cfg.graph.k_c), progress=False)
    expected = propagate(sym_normalize(refine_item_graph(idx, sim, cooc, float(cfg.graph.alpha))), items,
                         int(cfg.graph.layers))
    np.testing.assert_allclose(inputs.item_features, expected, rtol=1e-6, atol=1e-7)
    # only the item file: users come from reason -> encode as before
    only_items = build_inputs(compose_cfg(FILES[0], f"paths.cache_dir={tmp_path / 'cache'}", data_dir=data_dir))
    assert {"reason", "encode/users", "graph"} <= set(only_items.artifacts) and "encode/items" not in only_items.artifacts
    np.testing.assert_array_equal(only_items.item_features, inputs.item_features)


@pytest.mark.slow
def test_training_from_released_files_and_a_row_count_mismatch(released, tmp_path):
    data_dir, items, users = released
    run = tmp_path / "run"
    base = tiny_overrides(tmp_path, "trainer.max_epochs=1", "logger=none", *FILES, data_dir=data_dir)
    proc = run_module("mllmrec.train", *base, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["artifacts"]) == {"graph"} and metrics["epochs"] == 1
    np.save(data_dir / "user_preferences_feat.npy", users[:-1])
    bad = run_module("mllmrec.train", *base, f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "user_preferences_feat.npy" in last
    assert f"has {len(users) - 1} rows but the dataset has {len(users)} users (row = userID)" in last
