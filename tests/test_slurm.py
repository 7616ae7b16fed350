"""The grid on a real SLURM cluster (``make slurm-up``; skipped unless ``sinfo`` answers): the same
summary as the basic launcher; a job cancelled from outside is marked with SLURM's state while the
others stand, and a rerun trains only it; timeout -> requeue -> resume from last.ckpt gives the
metrics of an uninterrupted run; a request no node can meet is one line before submitting (or as
soon as SLURM says so); a job failing in Python is marked failed; a 4-job grid on a cold cache
builds each stage artifact once. Jobs find tests/slurm_helpers.py on PYTHONPATH (sbatch exports
the environment)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, run_module, tiny_overrides

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not _sinfo_answers(), reason="no SLURM cluster answers sinfo (make slurm-up)")]

METRICS = ("val/recall@20", "test/recall@10", "test/recall@20", "test/ndcg@10", "test/ndcg@20")
# a job that fits any node: 1 CPU, 2 GB, no GPU; the launcher polls every second
FITS = ("hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
        "hydra.launcher.poll_s=1", "hydra.launcher.end_grace_s=2")


@pytest.fixture(autouse=True)
def job_env(monkeypatch):
    """Jobs import tests/slurm_helpers.py and use one thread each (the machine's cores are shared)."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def grid_args(tiny_dir, out, *extra, launcher="slurm"):
    slurm = (f"hydra/launcher={launcher}", *FITS) if launcher == "slurm" else ()
    return tiny_overrides(out, "trainer.enable_progress_bar=false", "logger=none", *slurm, *extra,
                          data_dir=tiny_dir, cache=out / "cache", sweep=out / "sweep")


def slow(seconds: float, when: str | None = None) -> list[str]:
    """A SlowEpochs callback: ``seconds`` of sleep per epoch (only in jobs whose graph.k_c is ``when``)."""
    args = ["+callbacks.slow._target_=slurm_helpers.SlowEpochs", f"+callbacks.slow.seconds={seconds}"]
    return args + (["+callbacks.slow.k_c=${graph.k_c}", f"+callbacks.slow.only_k_c={when}"] if when else [])


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen([sys.executable, "-m", "mllmrec.train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def slurm_id(sweep: Path, timeout: float = 120) -> str:
    """The SLURM job id of the grid submitted into ``sweep`` (from submitit's submission script)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(sweep.glob(".submitit/*/*_submission.sh"))
        if found:
            return found[-1].name.split("_")[0]
        time.sleep(0.5)
    raise AssertionError(f"nothing submitted into {sweep}")


def squeue(job: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T|%r"], capture_output=True, text=True).stdout
    state, _, reason = out.strip().partition("|")
    return state, reason


def job_dirs(sweep: Path) -> dict[str, Path]:
    """{graph.k_c value: job folder}, read from each folder's .hydra/overrides.yaml (not from its name)."""
    out = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        k_c = re.search(r"graph\.k_c=(\d+)", overrides.read_text())
        out[k_c.group(1)] = overrides.parent.parent
    return out


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_two_job_grid_gives_the_summary_of_the_basic_launcher(tiny_dir, tmp_path):
    axes = ("trainer.max_epochs=2", "graph.alpha=0.6", "graph.k_c=5,10")
    basic = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path / "basic", *axes, launcher="basic"),
                       cwd=tmp_path, timeout=600)
    assert basic.returncode == 0, basic.stderr[-3000:]
    proc = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path / "slurm", *axes), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert list((tmp_path / "slurm" / "sweep" / ".submitit").glob("*/*_result.pkl")), "not run through SLURM"
    want = pd.read_csv(tmp_path / "basic" / "sweep" / "summary.csv").set_index("graph.k_c")
    got = pd.read_csv(tmp_path / "slurm" / "sweep" / "summary.csv").set_index("graph.k_c")
    assert sorted(got.index) == [5, 10] and (got["status"] == "completed").all()
    for key in (*METRICS, "best_epoch", "epochs"):
        assert got[key].to_dict() == pytest.approx(want[key].to_dict(), abs=1e-12), key
    assert (tmp_path / "slurm" / "sweep" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = [line.split("] ", 1)[-1] for line in (basic.stdout + basic.stderr).splitlines() if "best by validation" in line]
    assert best and best[0] in proc.stdout + proc.stderr  # the same best-cell line, numbers and all
    assert "multirun: 2 jobs in 2 cells (0 failed)" in proc.stdout + proc.stderr


def test_a_cancelled_job_is_marked_the_others_stand_and_a_rerun_trains_only_it(tiny_dir, tmp_path, monkeypatch):
    # no accounting: sacct fails as it does without slurmdbd; the launcher must not wait on it
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Problem talking to the database: Connection refused' >&2\n"
                                "exit 1\n")
    (fake / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    args = grid_args(tiny_dir, tmp_path, "trainer.max_epochs=3", "graph.alpha=0.6", "graph.k_c=5,10", *slow(8, when=10))
    proc = start(args, tmp_path)
    sweep = tmp_path / "sweep"
    array = slurm_id(sweep)
    deadline = time.time() + 300
    while not job_dirs(sweep).get("10", tmp_path / "-").joinpath("checkpoints", "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, (proc.communicate()[1] or "")[-3000:]
        time.sleep(0.5)
    assert squeue(f"{array}_1")[0] == "RUNNING"
    subprocess.run(["scancel", f"{array}_1"], check=True)
    cancelled_at = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    print(f"cancel -> exit {proc.returncode} in {time.time() - cancelled_at:.1f}s")
    assert proc.returncode == 1, (stdout + stderr)[-3000:]
    df = pd.read_csv(sweep / "summary.csv").set_index("graph.k_c")
    assert df.loc[5, "status"] == "completed" and 0 <= df.loc[5, "test/recall@20"] <= 1
    assert df.loc[10, "status"] == "CANCELLED"
    assert f"SLURM job {array}_1 ended CANCELLED" in df.loc[10, "error"]
    assert "1 of 2 jobs failed" in stderr
    done = job_dirs(sweep)["5"] / "metrics.json"
    before = done.read_text()

    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])  # accounting back
    again = run_module("mllmrec.train", *args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert done.read_text() == before  # the completed job did not train again
    assert "already holds a completed run" in (job_dirs(sweep)["5"] / "train.log").read_text()
    rerun = metrics(job_dirs(sweep)["10"])
    assert rerun["status"] == "completed" and rerun["resumed_from"].endswith("last.ckpt")
    assert (pd.read_csv(sweep / "summary.csv")["status"] == "completed").all()


def test_timeout_requeue_resume_gives_the_metrics_of_an_uninterrupted_run(tiny_dir, tmp_path):
    """A 1-minute limit, SIGUSR2 30 s before it; 12 epochs of 5 s need longer: the job is requeued
    (SLURM delays a requeued job by ~2 minutes; the test starts it at once) and resumes from last.ckpt."""
    cell = ("trainer.max_epochs=12", "callbacks.early_stopping.stopping_step=100", "graph.alpha=0.6", "graph.k_c=5")
    ref = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path / "ref", *cell, launcher="basic"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = grid_args(tiny_dir, tmp_path / "slurm", *cell, *slow(5), "hydra.launcher.timeout_min=1",
                     "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=6")
    proc = start(args, tmp_path)
    job = slurm_id(tmp_path / "slurm" / "sweep")
    began = time.time()
    while proc.poll() is None and time.time() - began < 900:
        state, reason = squeue(job)
        if state == "PENDING" and reason == "BeginTime":  # requeued: start it now, not in 2 minutes
            subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], capture_output=True)
        time.sleep(1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, (stdout + stderr)[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "sweep" / ".submitit").glob("*/*_log.*"))
    assert re.search(r"Requeued job \d+", logs), logs[-3000:]
    got = metrics(next(iter(job_dirs(tmp_path / "slurm" / "sweep").values())))
    want = metrics(next(iter(job_dirs(tmp_path / "ref" / "sweep").values())))
    assert got["resumed_from"] and got["resumed_from"].endswith("last.ckpt")
    assert got["epochs"] == want["epochs"] == 12 and got["best_epoch"] == want["best_epoch"]
    for key in METRICS:
        assert got[key] == want[key], key


def test_an_unsatisfiable_request_is_one_line_before_submitting(tiny_dir, tmp_path):
    """The preset's GPU defaults on this CPU node: named, with the cluster's offer and the fixes."""
    args = tiny_overrides(tmp_path, "trainer.max_epochs=1", "graph.k_c=5,10", "hydra/launcher=slurm",
                          data_dir=tiny_dir, cache=tmp_path / "cache", sweep=tmp_path / "sweep")
    proc = run_module("mllmrec.train", *args, cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: SLURM can never run this request"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for named in ("gpus_per_node=1", "no GPU", "set 0", "cpus_per_task=8", "mem_gb=32", "at most"):
        assert named in errors[0], named
    assert not (tmp_path / "sweep" / ".submitit").exists()  # nothing submitted


@pytest.mark.parametrize("request_, said", [
    ("hydra.launcher.gpus_per_node=1", "sbatch refused the grid: sbatch: error: Invalid generic resource"),
    ("hydra.launcher.cpus_per_task=64", "pending for PartitionConfig"),
])
def test_without_the_check_slurm_refusals_are_one_line_too(tiny_dir, tmp_path, request_, said):
    """check_cluster=false: sbatch's own refusal, or a job pending for ever, ends the command at once."""
    args = grid_args(tiny_dir, tmp_path, "trainer.max_epochs=1", "graph.k_c=5,10", "hydra.launcher.check_cluster=false",
                     request_)
    began = time.time()
    proc = run_module("mllmrec.train", *args, cwd=tmp_path)
    print(f"{request_}: exit {proc.returncode} after {time.time() - began:.1f}s")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and said in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    if "PartitionConfig" in said:
        assert "cpus_per_task=64" in errors[0]
        assert squeue(slurm_id(tmp_path / "sweep"))[0] in ("CANCELLED", "")  # the pending grid was cancelled


def test_a_job_failing_in_python_is_marked_failed_and_the_others_stand(tiny_dir, tmp_path):
    proc = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path, "trainer.max_epochs=1", "graph.alpha=0.7",
                                                  "graph.k_c=5,0"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    df = pd.read_csv(tmp_path / "sweep" / "summary.csv").set_index("graph.k_c")
    assert df.loc[0, "status"] == "failed" and "graph.k_c" in df.loc[0, "error"]
    assert df.loc[5, "status"] == "completed" and 0 <= df.loc[5, "test/recall@20"] <= 1
    assert "1 of 2 jobs failed" in proc.stderr


def test_four_jobs_on_a_cold_cache_build_each_artifact_once(tiny_dir, tmp_path):
    proc = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path, "trainer.max_epochs=1", "graph.alpha=0.6,0.7",
                                                  "graph.k_c=5,10", "hydra.launcher.array_parallelism=4"),
                      cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    logs = [(d / "train.log").read_text() for d in job_dirs(tmp_path / "sweep").values()]
    assert len(logs) == 4
    built = [m.groups() for log in logs for m in re.finditer(r"(\S+): built in [\d.]+s -> (\S+)", log)]
    per_artifact = pd.Series([path for _, path in built]).value_counts()
    assert (per_artifact == 1).all(), per_artifact[per_artifact > 1]
    cache = tmp_path / "cache" / "tiny"
    published = [p for stage in cache.iterdir() for p in stage.iterdir() if not p.name.startswith(".")]
    assert sorted(map(str, published)) == sorted(per_artifact.index)  # every artifact built, by one job
    assert sum("encode: built in" in log for log in logs) >= 1
    # two tasks ran at once (2 CPUs, 1 each) and met at a lock: one waited for the other's build
    assert any("another process holds" in log for log in logs), "no two jobs ever wanted the same artifact at once"
