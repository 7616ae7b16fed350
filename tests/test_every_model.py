"""Every model of the zoo the same way (RecBole's per-model test): each ``conf/model/<name>.yaml``
trains one epoch through the CLI on the tiny fixture, with two item modalities (the encode stage's
text embeddings and an image feature file), and writes its metrics. One multirun over all models
(one process: the imports are paid once); a new config is covered without editing this file."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_module, tiny_overrides
from model_zoo import MODEL_CONFS


@pytest.fixture(scope="module")
def zoo_sweep(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    n_items = int(pd.read_csv(tiny_dir / "tiny.inter", sep="\t")["itemID"].max()) + 1
    image = out / "image_feat.npy"
    np.save(image, np.random.default_rng(0).standard_normal((n_items, 8)).astype(np.float32))
    sweep = out / "sweep"
    proc = run_module("mllmrec.train", *tiny_overrides(
        out, f"model={','.join(MODEL_CONFS)}", "trainer.max_epochs=1", "logger=none", "trainer.enable_progress_bar=false",
        f"+dataset.features={{image: {image}}}", "graph.alpha=0.8", "graph.k_c=5", data_dir=tiny_dir, sweep=sweep),
        cwd=out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        model = dict(o.split("=", 1) for o in yaml.safe_load(overrides.read_text()))["model"]
        jobs[model] = overrides.parent.parent
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_CONFS)
def test_model_trains_one_epoch_through_the_cli(zoo_sweep, name):
    metrics = json.loads((zoo_sweep[name] / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1 and metrics["best_epoch"] == 0
    for key in ("val/recall@20", "test/recall@10", "test/recall@20", "test/ndcg@10", "test/ndcg@20"):
        assert 0.0 <= metrics[key] <= 1.0 and math.isfinite(metrics[key]), key
    assert (zoo_sweep[name] / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_a_job_dir_copied_from_the_multirun_works_as_an_override(zoo_sweep):
    """Job dirs are named ``<n>_<key>-<value>__...`` (no ``=`` or ``,``): passed back unquoted, as a new
    user would paste it, the path is one Hydra override value."""
    job = zoo_sweep["bpr"]
    assert "=" not in job.name and "," not in job.name and "model-bpr" in job.name
    proc = run_module("mllmrec.recommend", f"run_dir={job}", "topk=3", "user=1", cwd=job)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "user 1:" in proc.stdout


def test_job_dir_names_parse_back_as_one_override_value():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mllmrec.config import safe_dirname

    parser = OverridesParser.create()
    for dirname in ("experiment-plug_in__graph.alpha-0.7__graph.refine-true__model-freedom__seed-1",
                    "eval.topk-[5,20]__eval.valid_metric-ndcg@20", "+dataset.features-{image: /data/x.npy}",
                    "prepare.meta-C:\\data\\m.json", "name-a b'c\"(d)"):
        path = f"outputs/multirun/office/2026-12-02_08-00-00-000001/0_{safe_dirname(dirname)}"
        assert parser.parse_overrides([f"run_dir={path}"])[0].value() == path


def test_a_long_job_dir_name_is_cut_at_an_override_boundary():
    from mllmrec.config import safe_dirname

    overrides = "__".join(f"model.setting_{i}-{i * 1000}" for i in range(30))
    name = safe_dirname(overrides)
    assert len(name) <= 200 and overrides.startswith(name) and overrides[len(name):].startswith("__")
