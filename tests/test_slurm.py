"""The grid on a real SLURM cluster (``make slurm-up``; skipped unless ``sinfo`` answers).

- a 4-job grid on a cold cache: the same summary, heatmap and best-cell line as the basic
  launcher, and each stage artifact built once (the cache lock across SLURM tasks);
- a job cancelled with scancel while running is marked CANCELLED, a job failing in Python is
  marked failed, the third stands, the command exits 1 (with sacct failing, as without
  accounting); a rerun with the same sweep dir trains only the cancelled job, from its last.ckpt;
- timeout -> SIGUSR2 -> requeue -> resume from last.ckpt: the metrics of an uninterrupted run;
- a request no node can meet: one line before submitting; with the check off, as soon as SLURM
  refuses it (sbatch) or leaves it pending for a reason that never clears.

Every multirun costs a Python start-up per job (~30 s on a busy 2-core machine), so the
scenarios share grids. Jobs find tests/slurm_helpers.py on PYTHONPATH (sbatch exports it)."""

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


def jobs_see_helpers(mp: pytest.MonkeyPatch) -> None:
    """Jobs import tests/slurm_helpers.py and use one thread each (the machine's cores are shared)."""
    tests = str(Path(__file__).resolve().parent)
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    mp.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def job_env(monkeypatch):
    jobs_see_helpers(monkeypatch)


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


@pytest.fixture(scope="module")
def cold_grids(tiny_dir, tmp_path_factory):
    """The same 4-job grid on a cold cache through the basic launcher and through SLURM (4 tasks
    allowed at once; 2 CPUs run 2 of them together)."""
    out = tmp_path_factory.mktemp("cold")
    axes = ("trainer.max_epochs=1", "graph.alpha=0.6,0.7", "graph.k_c=5,10")
    # the first build of each task takes 8 s longer inside its lock: the two tasks that start
    # together meet at that lock whatever their start-up jitter (a race the CI once lost)
    meet = ("+hydra.callbacks.slow_build._target_=slurm_helpers.SlowFirstBuild", "+hydra.callbacks.slow_build.seconds=8")
    with pytest.MonkeyPatch.context() as mp:
        jobs_see_helpers(mp)
        slurm = start(grid_args(tiny_dir, out / "slurm", *axes, *meet, "hydra.launcher.array_parallelism=4"), out)
        basic = run_module("mllmrec.train", *grid_args(tiny_dir, out / "basic", *axes, launcher="basic"), cwd=out,
                           timeout=600)
        stdout, stderr = slurm.communicate(timeout=600)
    assert basic.returncode == 0, basic.stderr[-3000:]
    assert slurm.returncode == 0, (stdout + stderr)[-3000:]
    return out, basic.stdout + basic.stderr, stdout + stderr


def test_the_grid_gives_the_summary_of_the_basic_launcher(cold_grids):
    out, basic_logs, slurm_logs = cold_grids
    assert len(list((out / "slurm" / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 4, "not run through SLURM"
    index = ["graph.alpha", "graph.k_c"]
    want = pd.read_csv(out / "basic" / "sweep" / "summary.csv").set_index(index)
    got = pd.read_csv(out / "slurm" / "sweep" / "summary.csv").set_index(index)
    assert sorted(got.index) == [(0.6, 5), (0.6, 10), (0.7, 5), (0.7, 10)] and (got["status"] == "completed").all()
    for key in (*METRICS, "best_epoch", "epochs"):
        assert got[key].to_dict() == pytest.approx(want[key].to_dict(), abs=1e-12), key
    assert (out / "slurm" / "sweep" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = [line.split("] ", 1)[-1] for line in basic_logs.splitlines() if "best by validation" in line]
    assert best and best[0] in slurm_logs  # the same best-cell line, numbers and all
    assert "multirun: 4 jobs in 4 cells (0 failed)" in slurm_logs


def test_four_jobs_on_a_cold_cache_build_each_artifact_once(cold_grids):
    out = cold_grids[0] / "slurm"
    logs = [(p.parent.parent / "train.log").read_text() for p in (out / "sweep").glob("*/.hydra/overrides.yaml")]
    assert len(logs) == 4
    built = [m.group(1) for log in logs for m in re.finditer(r"\S+: built in [\d.]+s -> (\S+)", log)]
    per_artifact = pd.Series(built, dtype=str).value_counts()
    assert (per_artifact == 1).all(), per_artifact[per_artifact > 1]
    # a second build of the same key loses the publish race and says so instead of "built in"
    raced = [line for log in logs for line in log.splitlines() if "published concurrently" in line]
    assert not raced, raced
    cache = out / "cache" / "tiny"
    published = [p for stage in cache.iterdir() for p in stage.iterdir() if not p.name.startswith(".")]
    assert sorted(map(str, published)) == sorted(per_artifact.index)  # every artifact built, by one job
    assert len(published) >= 6  # encode (items, users), graph-knn, 2 graph-cooc, 4 graph, ...
    # two tasks ran at once and met at a lock: one waited for the other's build, then reused it
    assert any("another process holds" in log for log in logs), "no two jobs wanted the same artifact at once"


def test_cancelled_and_failed_jobs_are_marked_the_other_stands_and_a_rerun_trains_only_them(tiny_dir, tmp_path,
                                                                                           monkeypatch):
    """k_c=5 completes, k_c=0 fails in Python (a ConfigError), k_c=10 (slow) is cancelled while training."""
    fake = tmp_path / "bin"  # no accounting: sacct fails as it does without slurmdbd
    fake.mkdir()
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Problem talking to the database: Connection refused' >&2\n"
                                "exit 1\n")
    (fake / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    args = grid_args(tiny_dir, tmp_path, "trainer.max_epochs=2", "graph.alpha=0.6", "graph.k_c=5,0,10", *slow(10, when=10))
    proc = start(args, tmp_path)
    sweep = tmp_path / "sweep"
    array = slurm_id(sweep)
    deadline = time.time() + 400
    while not job_dirs(sweep).get("10", tmp_path / "-").joinpath("checkpoints", "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, (proc.communicate()[1] or "")[-3000:]
        time.sleep(0.5)
    assert squeue(f"{array}_2")[0] == "RUNNING"
    subprocess.run(["scancel", f"{array}_2"], check=True)
    cancelled_at = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    print(f"scancel -> exit {proc.returncode} {time.time() - cancelled_at:.1f}s later")
    assert proc.returncode == 1, (stdout + stderr)[-3000:]
    df = pd.read_csv(sweep / "summary.csv").set_index("graph.k_c")
    assert df.loc[5, "status"] == "completed" and 0 <= df.loc[5, "test/recall@20"] <= 1
    assert df.loc[0, "status"] == "failed" and "graph.k_c" in df.loc[0, "error"]
    assert df.loc[10, "status"] == "CANCELLED" and f"SLURM job {array}_2 ended CANCELLED" in df.loc[10, "error"]
    assert "2 of 3 jobs failed" in stderr
    done = job_dirs(sweep)["5"] / "metrics.json"
    before = done.read_text()

    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])  # accounting back
    again = run_module("mllmrec.train", *args, cwd=tmp_path, timeout=600)
    assert again.returncode == 1, (again.stdout + again.stderr)[-3000:]  # k_c=0 fails again
    assert done.read_text() == before  # the completed job did not train again
    assert "already holds a completed run" in (job_dirs(sweep)["5"] / "train.log").read_text()
    rerun = metrics(job_dirs(sweep)["10"])
    assert rerun["status"] == "completed" and rerun["resumed_from"].endswith("last.ckpt")
    assert rerun["epochs"] == 2
    assert "1 of 3 jobs failed" in again.stderr


def test_timeout_requeue_resume_gives_the_metrics_of_an_uninterrupted_run(tiny_dir, tmp_path):
    """A 2-minute limit, SIGUSR2 30 s before it (SLURM checks limits every ~30 s, so it comes
    60-90 s in; the job must have installed submitit's handler by then: Python's start-up on a busy
    machine takes ~30 s). The first run sleeps 15 s per epoch, so 8 epochs need longer: SIGUSR2,
    requeue (SLURM delays a requeued job by ~2 minutes; the test starts it at once); the second run
    (not slowed) resumes from last.ckpt."""
    cell = ("trainer.max_epochs=8", "callbacks.early_stopping.stopping_step=100", "graph.alpha=0.6", "graph.k_c=5")
    proc = start(grid_args(tiny_dir, tmp_path / "slurm", *cell, *slow(15), "+callbacks.slow.first_run_only=true",
                           "hydra.launcher.timeout_min=2",
                           "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=6"), tmp_path)
    ref = run_module("mllmrec.train", *grid_args(tiny_dir, tmp_path / "ref", *cell, launcher="basic"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    job = slurm_id(tmp_path / "slurm" / "sweep")
    began = time.time()
    while proc.poll() is None and time.time() - began < 900:
        state, reason = squeue(job)
        if state == "PENDING" and reason == "BeginTime":  # requeued: start it now, not in 2 minutes
            subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], capture_output=True)
        time.sleep(1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, (stdout + stderr)[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "sweep" / ".submitit").glob("*/*_log.out"))
    assert "Caught signal SIGUSR2" in logs and re.search(r"Requeued job \d+", logs), logs[-3000:]
    got = metrics(next(iter(job_dirs(tmp_path / "slurm" / "sweep").values())))
    want = metrics(next(iter(job_dirs(tmp_path / "ref" / "sweep").values())))
    assert got["resumed_from"] and got["resumed_from"].endswith("last.ckpt")
    assert got["epochs"] == want["epochs"] == 8 and got["best_epoch"] == want["best_epoch"]
    for key in METRICS:
        assert got[key] == want[key], key


def test_an_unsatisfiable_request_is_one_line_before_submitting(tiny_dir, tmp_path):
    """The preset's GPU-cluster defaults on this CPU node: named, with the cluster's offer and the fixes."""
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


@pytest.mark.parametrize("setting", ["gpus_per_node", "cpus_per_task", "mem_gb"])
def test_each_setting_beyond_every_node_is_named_with_what_the_cluster_offers(setting):
    from mllmrec import slurm

    nodes = slurm.cluster_nodes()
    most = {"gpus_per_node": max(n.gpus for n in nodes), "cpus_per_task": max(n.cpus for n in nodes),
            "mem_gb": max(n.mem_mb for n in nodes) // 1024}
    params = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5}
    slurm.check_request(params)  # fits
    with pytest.raises(slurm.SlurmError) as err:
        slurm.check_request({**params, setting: most[setting] + 1})
    message = str(err.value)
    assert "\n" not in message and f"hydra.launcher.{setting}={most[setting] + 1}" in message
    assert (f"set at most {most[setting]}" if setting != "gpus_per_node" or most[setting] else "set 0") in message
    assert f"at most {most['cpus_per_task']} CPUs, {most['mem_gb']} GB" in message


def test_without_the_check_sbatch_refusal_is_one_line(tmp_path):
    from mllmrec import slurm, slurm_launch
    from slurm_helpers import FakeLauncher

    with pytest.raises(slurm.SlurmError, match="^sbatch refused the grid: sbatch: error: Invalid generic resource"):
        slurm_launch.submit(FakeLauncher(tmp_path, gpus_per_node=1), [["a=1"], ["a=2"]], 0)


def test_without_the_check_a_job_slurm_will_never_start_cancels_the_grid_at_once(tmp_path):
    from mllmrec import slurm, slurm_launch
    from slurm_helpers import FakeLauncher

    launcher = FakeLauncher(tmp_path, cpus_per_task=64)
    jobs = slurm_launch.submit(launcher, [["a=1"], ["a=2"]], 0)
    began = time.time()
    with pytest.raises(slurm.SlurmError) as err:
        slurm_launch.wait(jobs, slurm_launch.Watch(poll_s=0.5), launcher.params)
    print(f"PartitionConfig -> error in {time.time() - began:.1f}s")
    assert "pending for PartitionConfig" in str(err.value) and "cpus_per_task=64" in str(err.value)
    assert "cancelled the grid" in str(err.value) and time.time() - began < 30
    time.sleep(1)
    assert squeue(jobs[0].job_id)[0] == "CANCELLED"


def test_srun_two_tasks_train_one_job(tiny_dir, tmp_path):
    """One training job on 2 processes under SLURM (docs/distributed.md): ``srun`` starts 2 tasks inside
    an sbatch allocation, Lightning's SLURMEnvironment ranks them, both meet in the run dir
    ``slurm-<job>.<step>`` (no hydra.run.dir given), rank 0 alone writes metrics.json, whose metrics are
    the 1-process evaluation of the best checkpoint to the last bit."""
    import shlex

    import numpy as np

    from mllmrec.datamodule import RecDataModule
    from mllmrec.runs import load_run

    args = tiny_overrides(tmp_path, "trainer.enable_progress_bar=false", "logger=none", "trainer.max_epochs=2",
                          "trainer.devices=2", "trainer.strategy=ddp", data_dir=tiny_dir, cache=tmp_path / "cache")
    script = tmp_path / "ddp.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --mem=3G --time=00:20:00\n"
                      f"#SBATCH --output={tmp_path}/slurm-%j.out\n"
                      f"srun {shlex.quote(sys.executable)} -m mllmrec.train {' '.join(map(shlex.quote, args))}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(["sbatch", "--parsable", "--wait", f"--chdir={tmp_path}", str(script)], env=env,
                          capture_output=True, text=True, timeout=1200)
    job = proc.stdout.strip().split(";")[0]
    log = (tmp_path / f"slurm-{job}.out").read_text() if job else proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log and "sync_dist" not in log
    assert log.count("best epoch") == 1 and "rank 1 of 2 done; rank 0 writes" in log
    runs = sorted((tmp_path / "runs" / "tiny").iterdir())
    assert [r.name for r in runs] == [f"slurm-{job}.0"]  # both tasks in one run dir
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert m["status"] == "completed" and m["processes"] == 2 and m["epochs"] == 2
    run = load_run(runs[0])
    dm = RecDataModule(seed=int(run.cfg.seed)).attach(run.inputs.data)
    dm.setup()
    alone = run.model.evaluate(dm.eval_batches["test"])
    for key in (k for k in METRICS if k.startswith("test/")):
        assert m[key] == float(np.float32(alone[key.removeprefix("test/")])), key  # logged as float32
