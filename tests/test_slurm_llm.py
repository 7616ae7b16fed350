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
# time limit 6 min, SIGUSR2 120 s before it (SLURM checks limits every ~30 s: it comes 240-270 s in).
# In its first run shard 0 waits after its first saved chunk (of 1 answer) until the signal comes
# (slurm_helpers.SlowChunks), so it reaches its time limit mid-generation however fast the machine;
# its requeued run (Python, the engine: ~1 min on 1 free core, ~4 on a busy 2-core machine) finishes.
TIME_LIMIT = ("hydra.launcher.timeout_min=6", "hydra.launcher.signal_delay_s=120", "hydra.launcher.max_num_timeout=3")
SLOW = ("+hydra.callbacks.slow_chunks._target_=slurm_helpers.SlowChunks", "+hydra.callbacks.slow_chunks.shard=0")


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
            if state == "PENDING" and reason in ("BeginTime", "None", ""):  # requeued: start it now, not in 2 min
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
    # nothing generated twice: every answer saved once; shard 0's split between its runs (0: before
    # the time limit; 1, ...: after each requeue), each resumed run starting from what the others saved
    saved = parts(tmp_path / "sharded" / "cache")
    assert len(saved) == LIMIT and saved.id.is_unique, saved[["id", "source"]]
    runs: dict[int, int] = {}
    for source, n in saved.source.value_counts().items():
        if source.startswith("shard 0 of 2"):
            runs[int(source.rsplit(" ", 1)[1])] = n
    assert runs.get(0, 0) >= 1 and len(runs) >= 2 and sum(runs.values()) == LIMIT // 2, runs
    for run in sorted(runs)[1:]:
        earlier = sum(n for r, n in runs.items() if r < run)
        assert f"reason: {earlier} of {LIMIT // 2} answers already saved in " in shard0, (run, runs)
    last = max(runs)
    assert f"shard 0 of 2 is done ({LIMIT // 2} requests, {runs[last]} generated now)" in shard0, shard0[-3000:]
    print(f"shard 0: answers saved per run (0 = before the time limit): {dict(sorted(runs.items()))}; "
          f"every source: {saved.source.value_counts().to_dict()}")

    merge = run_module("stages.reason", *reason_args(tmp_path / "sharded", tiny_dir), cwd=tmp_path, timeout=600)
    assert merge.returncode == 0, merge.stderr[-3000:]
    said = merge.stdout + merge.stderr
    assert f"its {LIMIT} answers came from: " in said and "vllm: loading" not in said, said[-3000:]
    pd.testing.assert_frame_equal(users(tmp_path / "sharded" / "cache"), users(tmp_path / "ref" / "cache"))
    published = sorted(p.name for p in (tmp_path / "sharded" / "cache" / "tiny" / "reason").iterdir()
                       if not p.name.startswith("."))
    assert published == sorted(p.name for p in (tmp_path / "ref" / "cache" / "tiny" / "reason").iterdir()
                               if not p.name.startswith("."))  # the same artifact key
