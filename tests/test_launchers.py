"""Hydra launchers: 2-job grids through joblib (hydra/launcher=parallel) and submitit's local
executor (hydra/launcher=local, the SLURM code path without a scheduler) complete with the full
multirun summary; the SLURM preset composes with its documented keys; per-job GPU choice."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from conftest import run_module, tiny_overrides

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def grid_args(tiny_dir, out, launcher, *extra):
    return tiny_overrides(out, "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "graph.alpha=0.6",
                          "graph.k_c=5,10", f"hydra/launcher={launcher}", *extra,
                          data_dir=tiny_dir, cache=out / "cache", sweep=out / "sweep")


def check_full_summary(out, proc):
    """Both jobs completed, summary.csv holds what each job's metrics.json says, heatmap and best line."""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep = out / "sweep"
    df = pd.read_csv(sweep / "summary.csv")
    assert sorted(df["graph.k_c"]) == [5, 10] and (df["graph.alpha"] == 0.6).all()
    assert (df["status"] == "completed").all(), df[["job", "status", "error"]]
    for _, row in df.iterrows():
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs"] == 1
        for key in ("val/recall@20", "test/recall@10", "test/recall@20", "test/ndcg@10", "test/ndcg@20"):
            assert row[key] == pytest.approx(metrics[key], abs=1e-12), key
    assert (sweep / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = df.loc[df["val/recall@20"].idxmax()]
    logs = proc.stdout + proc.stderr
    assert "multirun: 2 jobs in 2 cells (0 failed)" in logs
    assert f"best by validation R@20: graph.alpha=0.6,graph.k_c={int(best['graph.k_c'])}" in logs
    return df


@pytest.mark.slow
def test_joblib_two_concurrent_jobs_share_one_fresh_cache(tiny_dir, tmp_path):
    """Two jobs at once, both needing the same missing stage artifacts (encode, graph-knn)."""
    proc = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path, "parallel", "hydra.launcher.n_jobs=2",
                                                  "launcher.gpus_per_node=2"), cwd=tmp_path, timeout=600)
    df = check_full_summary(tmp_path, proc)
    for job in df["job"]:  # the per-job GPU choice ran in each job (no GPU here: it says so and trains on CPU)
        assert "launcher.gpus_per_node=2 but no CUDA device" in (tmp_path / "sweep" / job / "train.log").read_text()
    cache = tmp_path / "cache" / "tiny"
    # one published artifact per key, no leftover temporary folders from the concurrent builds
    def published(stage):  # artifact folders; the builders' lock files are hidden (.<key>.lock)
        return [p for p in (cache / stage).iterdir() if not p.name.startswith(".")]

    assert len(published("graph-knn")) == 1
    assert len(published("graph")) == 2
    assert not list(cache.glob("*/.*tmp*"))
    for stage in cache.iterdir():
        for artifact in published(stage.name):
            assert (artifact / "manifest.json").is_file(), artifact


@pytest.mark.slow
def test_submitit_local_two_jobs_full_summary(tiny_dir, tmp_path):
    proc = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path, "local"), cwd=tmp_path, timeout=600)
    check_full_summary(tmp_path, proc)
    # the jobs really went through submitit: its per-job folders with pickled results
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2


def test_slurm_preset_has_the_documented_keys(compose_cfg):
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.mem_gb=64"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.mllmrec_slurm.mllmrec_slurm_launcher.MllmrecSlurmLauncher"
    from hydra.utils import get_class

    bases = [f"{c.__module__}.{c.__name__}" for c in get_class(launcher._target_).__mro__]
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in bases  # plus mllmrec's check and wait
    assert launcher.check_cluster and launcher.poll_s > 0 and launcher.signal_delay_s == 120
    assert launcher.partition == "gpu" and launcher.mem_gb == 64
    assert launcher.gpus_per_node == 1 and launcher.cpus_per_task == 8 and launcher.timeout_min == 120
    assert launcher.max_num_timeout > 0  # requeue on timeout; resume=auto continues the job dir
    assert cfg.launcher.gpus_per_node == 0  # SLURM picks the GPUs, not the job number


def test_gpu_for_job_round_robin():
    from mllmrec.errors import ConfigError
    from mllmrec.launch import gpu_for_job

    assert [gpu_for_job(n, 4) for n in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert [gpu_for_job(n, 1) for n in range(3)] == [0, 0, 0]  # one GPU: all jobs share it
    assert gpu_for_job(5, 0) is None and gpu_for_job(None, 4) is None
    with pytest.raises(ConfigError, match="launcher.gpus_per_node"):
        gpu_for_job(0, -1)


def test_placement_outside_a_multirun_leaves_the_trainer_alone(compose_cfg, caplog):
    from mllmrec.launch import trainer_placement

    cfg = compose_cfg("launcher.gpus_per_node=2")
    with caplog.at_level(logging.WARNING):
        assert trainer_placement(cfg) == {}  # not a multirun job: no job number
