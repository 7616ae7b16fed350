"""Helpers for the SLURM tests (importable inside SLURM jobs: the tests put tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl
from hydra.experimental.callback import Callback


class SlowEpochs(pl.Callback):
    """Sleeps ``seconds`` after every training epoch: a job that needs longer than its time limit,
    or that is still running when a test cancels it, without using the shared CPUs. With
    ``only_k_c``, only the job whose ``k_c`` (pass ``${graph.k_c}``) equals it is slow; with
    ``first_run_only``, a job that SLURM requeued (``SLURM_RESTART_COUNT`` > 0) is not."""

    def __init__(self, seconds: float = 5.0, k_c: int | None = None, only_k_c: int | None = None,
                 first_run_only: bool = False):
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        slow = (only_k_c is None or k_c == only_k_c) and not (first_run_only and requeued)
        self.seconds = float(seconds) if slow else 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)


class FakeLauncher:
    """What :func:`mllmrec.slurm_launch.submit` reads of a Hydra launcher (``params``, ``config``),
    for submitting from a test without Hydra; calling it (as a SLURM job) returns its arguments."""

    def __init__(self, sweep_dir, **params):
        from omegaconf import OmegaConf

        self.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
        self.params = {"submitit_folder": f"{sweep_dir}/.submitit/%j", "max_num_timeout": 0, "timeout_min": 5,
                       "cpus_per_task": 1, "mem_gb": 1, "gpus_per_node": 0, "name": "fake", **params}

    def __call__(self, *args):
        return args


class SlowFirstBuild:
    """A Hydra callback (``+hydra.callbacks.slow_build._target_=slurm_helpers.SlowFirstBuild``):
    in the job's process, the first artifact it builds takes ``seconds`` longer, inside the cache
    lock. Two tasks started together then meet at that lock whatever their start-up jitter, so the
    waiting path is exercised every time instead of when timing happens to allow it."""

    def __init__(self, seconds: float = 8.0):
        self.seconds = float(seconds)

    def on_job_start(self, config=None, **kwargs) -> None:
        from mllmrec.cache import store

        original, seconds, done = store.ArtifactCache._build, self.seconds, []

        def slow_build(cache, *args, **kw):
            if not done:
                done.append(True)
                time.sleep(seconds)
            return original(cache, *args, **kw)

        store.ArtifactCache._build = slow_build


class SlowChunks(Callback):
    """A Hydra callback (``+hydra.callbacks.slow_chunks._target_=slurm_helpers.SlowChunks``): in
    the job whose ``llm.shard`` is ``shard``, and only in its first run (``SLURM_RESTART_COUNT``
    0), every chunk of answers saved is followed by a wait of up to ``seconds`` that ends when
    SLURM's SIGUSR2 (the time limit near) has come: a shard that reaches its time limit
    mid-generation whatever the machine's speed. Its requeued runs are not slowed."""

    def __init__(self, seconds: float = 600.0, shard: int = 0):
        self.seconds = float(seconds)
        self.shard = int(shard)

    def on_job_start(self, config=None, **kwargs) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 or config.llm.get("shard") != self.shard:
            return
        from mllmrec.llm import runner

        original, seconds = runner.WorkStore.save, self.seconds

        def slow_save(store, *args, **kw):
            out = original(store, *args, **kw)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                held = runner.HeldSignal.active
                if held is not None and held.received is not None:
                    break
                time.sleep(1.0)
            return out

        runner.WorkStore.save = slow_save
