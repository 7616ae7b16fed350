"""The LLM shards as a SLURM array, with the real engine (CI's SLURM step: ``make test-slurm`` runs
the tests marked both ``slurm`` and ``vllm`` in ``.venv-llm``, so the jobs' Python has vLLM;
skipped unless ``sinfo`` answers and vLLM is importable).

``python -m stages.reason llm=tiny llm.num_shards=2 llm.shard=0,1 hydra/launcher=slurm -m`` on the
tiny fixture: shard 0 is slowed in its first run (``slurm_helpers.SlowChunks``: a sleep after every
saved chunk) so that it reaches its time limit mid-generation; SLURM's warning (SIGUSR2) is held
until the chunk in flight is saved, submitit requeues the job, and the requeued run generates only
the answers not saved yet. Then the run without ``llm.shard`` publishes, generating nothing, the
artifact an unsharded run publishes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_module, tiny_overrides
from test_slurm import _sinfo_answers, jobs_see_helpers, slurm_id, squeue

try:  # the jobs run this Python: it must have vLLM (make test-slurm runs this file in .venv-llm)
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}); make test-slurm runs this in .venv-llm",
                allow_module_level=True)

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

from mllmrec.llm import convert  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not _sinfo_answers(), reason="no SLURM cluster answers sinfo (make slurm-up)")]

# a job that fits the one-node cluster: 1 CPU, 4 GB (the engine: ~1.5 GB of model and KV cache), no GPU
FITS = ("hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
        "hydra.launcher.poll_s=1", "hydra.launcher.end_grace_s=2")
LIMIT = 12  # users; 6 per shard
# time limit 3 min, SIGUSR2 75 s before it (SLURM checks limits every ~30 s: it comes 105-135 s in);
# shard 0 sleeps 30 s after each saved chunk of 1 answer in its first run, so it cannot finish
# its 6 answers before the signal, and its last saved chunk plus a sleep end before the hard limit
TIME_LIMIT = ("hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=75", "hydra.launcher.max_num_timeout=3")
SLOW = ("+hydra.callbacks.slow_chunks._target_=slurm_helpers.SlowChunks", "+hydra.callbacks.slow_chunks.seconds=30",
        "+hydra.callbacks.slow_chunks.shard=0")


@pytest.fixture(autouse=True)
def job_env(monkeypatch):
    jobs_see_helpers(monkeypatch)


def reason_args(out: Path, tiny_dir: Path, *extra: str, sweep: Path | None = None) -> list[str]:
    return tiny_overrides(out, "llm=tiny", f"llm.model={convert.convert()}", f"llm.limit={LIMIT}",
                          "llm.sampling.max_tokens=32", "llm.chunk_size=1", "logger=none", *extra,
                          data_dir=tiny_dir, cache=out / "cache", run=None if sweep else out / "run", sweep=sweep)


def users(cache: Path) -> pd.DataFrame:
    (path,) = (cache / "tiny" / "reason").glob("*/users.parquet")
    return pd.read_parquet(path)


def parts(cache: Path) -> pd.DataFrame:
    (work,) = (cache / "tiny" / "reason").glob(".work-*")
    return pd.concat([pd.read_parquet(p) for p in sorted(work.glob("part-*.parquet"))], ignore_index=True)


def test_a_timed_out_shard_is_requeued_resumes_and_the_merge_equals_the_unsharded_run(tiny_dir, tmp_path):
    sweep = tmp_path / "sharded" / "sweep"
    cmd = [sys.executable, "-m", "stages.reason",
           *reason_args(tmp_path / "sharded", tiny_dir, "llm.num_shards=2", "llm.shard=0,1", "hydra/launcher=slurm",
                        *FITS, *TIME_LIMIT, *SLOW, sweep=sweep)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ref = run_module("stages.reason", *reason_args(tmp_path / "ref", tiny_dir), cwd=tmp_path, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    job = slurm_id(sweep)
    began = time.time()
    while proc.poll() is None and time.time() - began < 1200:
        for task in (f"{job}_0", f"{job}_1"):
            state, reason = squeue(task)
            if state == "PENDING" and reason == "BeginTime":  # requeued: start it now, not in 2 minutes
                subprocess.run(["scontrol", "update", f"jobid={task}", "starttime=now"], capture_output=True)
        time.sleep(1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, (stdout + stderr)[-3000:]

    # shard 0's logs: submitit's (both runs append to them) and the Hydra job's own
    shard0 = "".join(p.read_text() for p in (sweep / ".submitit").glob(f"*/{job}_0_log.*"))
    shard0 += "".join(p.read_text() for folder in sweep.iterdir() if (folder / ".hydra" / "overrides.yaml").is_file()
                      and "llm.shard=0" in (folder / ".hydra" / "overrides.yaml").read_text()
                      for p in folder.glob("*.log"))
    assert "Caught signal SIGUSR2" in shard0 and re.search(r"Requeued job \d+", shard0), shard0[-3000:]
    assert "held until the chunk in flight was saved" in shard0, shard0[-3000:]
    # nothing generated twice: every answer saved once, shard 0's split between its two runs
    saved = parts(tmp_path / "sharded" / "cache")
    assert len(saved) == LIMIT and saved.id.is_unique, saved[["id", "source"]]
    by_source = saved.source.value_counts().to_dict()
    before = sum(n for s, n in by_source.items() if s.startswith("shard 0 of 2") and s.endswith("run 0"))
    after = sum(n for s, n in by_source.items() if s.startswith("shard 0 of 2") and s.endswith("run 1"))
    assert before >= 1 and after >= 1 and before + after == LIMIT // 2, by_source
    assert re.search(rf"reason: {before} of {LIMIT // 2} answers already saved in .*; {after} to generate", shard0)
    assert re.search(rf"shard 0 of 2 is done \({LIMIT // 2} requests, {after} generated now\)", shard0)
    print(f"shard 0: {before} answers saved before the time limit, {after} after the requeue; sources: {by_source}")

    merge = run_module("stages.reason", *reason_args(tmp_path / "sharded", tiny_dir), cwd=tmp_path, timeout=600)
    assert merge.returncode == 0, merge.stderr[-3000:]
    said = merge.stdout + merge.stderr
    assert f"its {LIMIT} answers came from: " in said and "vllm: loading" not in said, said[-3000:]
    pd.testing.assert_frame_equal(users(tmp_path / "sharded" / "cache"), users(tmp_path / "ref" / "cache"))
    published = sorted(p.name for p in (tmp_path / "sharded" / "cache" / "tiny" / "reason").iterdir()
                       if not p.name.startswith("."))
    assert published == sorted(p.name for p in (tmp_path / "ref" / "cache" / "tiny" / "reason").iterdir()
                               if not p.name.startswith("."))  # the same artifact key
