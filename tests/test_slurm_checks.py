"""The SLURM launcher's logic without a cluster: reading sinfo/squeue/sacct output, naming a request
no node can meet, and the wait loop's decisions (a result, SLURM's end state, a forgotten job with
sacct failing, a silent controller, a reason that never clears) on scripted cluster answers."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from mllmrec import slurm, slurm_launch
from mllmrec.slurm import Node

INF = float("inf")


def test_gpus_and_time_limits_are_read_as_sinfo_prints_them():
    assert slurm.parse_gpus("(null)") == 0
    assert slurm.parse_gpus("gpu:4") == 4
    assert slurm.parse_gpus("gpu:a100:2(S:0-1),gpu:v100:1,license:3") == 3
    assert slurm.parse_time_min("infinite") == INF
    assert slurm.parse_time_min("30") == 30
    assert slurm.parse_time_min("1:30:00") == 90
    assert slurm.parse_time_min("2-00:00:00") == 2880
    assert slurm.parse_time_min("0:45") == pytest.approx(0.75)  # MM:SS


CPU = [Node("c1", "debug", True, 2, 24105, 0, INF)]
GPU = [Node("g1", "gpu", False, 32, 256000, 4, 240), Node("g2", "gpu", False, 64, 512000, 8, 240)] + CPU


def request(**kw):
    return {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 60, **kw}


def test_a_request_that_fits_some_node_passes():
    assert slurm.request_problems(request(), CPU) == []
    assert slurm.request_problems(request(gpus_per_node=8, cpus_per_task=64, mem_gb=400), GPU[:2]) == []


def test_each_setting_beyond_every_node_is_named_with_the_fix():
    (gpu,) = slurm.request_problems(request(gpus_per_node=1), CPU)
    assert gpu == "hydra.launcher.gpus_per_node=1: no node has a GPU: set 0"
    (cpu,) = slurm.request_problems(request(cpus_per_task=8), CPU)
    assert cpu == "hydra.launcher.cpus_per_task=8: set at most 2"
    (mem,) = slurm.request_problems(request(mem_gb=32), CPU)
    assert mem == "hydra.launcher.mem_gb=32: set at most 23"  # 24105 MB = 23.5 GB (SLURM's GB is 1024 MB)
    (time_,) = slurm.request_problems(request(timeout_min=300), GPU[:2])
    assert time_ == "hydra.launcher.timeout_min=300: set at most 240"
    assert slurm.request_problems(request(gpus_per_node=16), GPU[:2]) == ["hydra.launcher.gpus_per_node=16: set at most 8"]
    both = slurm.request_problems(request(gpus_per_node=1, cpus_per_task=8, mem_gb=32), CPU)
    assert [p.split("=")[0] for p in both] == ["hydra.launcher.gpus_per_node", "hydra.launcher.cpus_per_task",
                                                "hydra.launcher.mem_gb"]


def test_resources_on_different_nodes_do_not_add_up():
    nodes = [Node("a", "p", True, 64, 8000, 0, INF), Node("b", "p", True, 4, 500000, 0, INF)]
    assert slurm.request_problems(request(cpus_per_task=32, mem_gb=100), nodes) == [
        "no single node has 32 CPUs, 100 GB and 0 GPU(s) together"]


def test_the_target_partition_is_the_default_or_the_named_one():
    nodes, where = slurm.target_nodes(GPU, None)
    assert [n.name for n in nodes] == ["c1"] and where == "default partition 'debug'"
    nodes, where = slurm.target_nodes(GPU, "gpu")
    assert [n.name for n in nodes] == ["g1", "g2"]
    with pytest.raises(slurm.SlurmError, match=r"no partition 'a100' on this cluster \(it has: debug\*, gpu"):
        slurm.target_nodes(GPU, "a100")


def test_squeue_and_sacct_lines_become_states_per_job():
    out = "7_1|PENDING|Resources\n7_0|RUNNING|None\n8_0|RUNNING|None\n7_[2-3%2]|PENDING|JobArrayTaskLimit\n"
    assert slurm._parse_states(out, "7") == {"7_1": ("PENDING", "Resources"), "7_0": ("RUNNING", "None")}
    acct = "7_0|COMPLETED\n7_1|CANCELLED by 0\n7_1.batch|CANCELLED\n"
    assert slurm._parse_states(acct, "7", reason_field=False) == {"7_0": ("COMPLETED", ""), "7_1": ("CANCELLED", "")}
    assert slurm._parse_states("9|TIMEOUT|TimeLimit\n", "9") == {"9": ("TIMEOUT", "TimeLimit")}


class Cluster:
    """Scripted answers: ``squeue`` returns the next dict of ``answers`` (None: no answer), then the last."""

    def __init__(self, monkeypatch, answers, sacct=({}, "sacct: error: Problem talking to the database")):
        self.answers, self.calls, self.cancelled = list(answers), 0, []
        monkeypatch.setattr(slurm, "task_states", self.squeue)
        monkeypatch.setattr(slurm, "accounting_states", lambda array: sacct)
        monkeypatch.setattr(slurm, "cancel", self.cancelled.append)
        monkeypatch.setattr(slurm_launch.time, "sleep", lambda s: None)
        self.clock = 0.0
        monkeypatch.setattr(slurm_launch.time, "monotonic", lambda: self.clock)

    def squeue(self, array):
        self.calls += 1
        self.clock += 1.0  # one second per poll
        return self.answers[min(self.calls, len(self.answers)) - 1]


def fake_jobs(tmp_path: Path, n: int, array: str = "7"):
    jobs = []
    for i in range(n):
        paths = types.SimpleNamespace(result_pickle=tmp_path / f"{array}_{i}_result.pkl", stderr=tmp_path / f"{i}.err")
        jobs.append(types.SimpleNamespace(job_id=f"{array}_{i}", paths=paths))
    return jobs


WATCH = slurm_launch.Watch(poll_s=1, end_grace_s=3, controller_timeout_s=10)


def test_a_result_ends_the_wait_and_slurm_s_end_state_marks_a_job_without_one(tmp_path, monkeypatch):
    jobs = fake_jobs(tmp_path, 2)
    jobs[0].paths.result_pickle.write_bytes(b"x")
    cluster = Cluster(monkeypatch, [{"7_1": ("RUNNING", "None")}, {"7_1": ("CANCELLED", "None")}])
    ends = slurm_launch.wait(jobs, WATCH)
    assert ends[0] is None and ends[1].state == "CANCELLED"
    assert ends[1].message.startswith("SLURM job 7_1 ended CANCELLED without a result")
    assert cluster.calls == 2 + 3  # the grace for a lagging result file: 3 s after SLURM said so


def test_a_requeued_job_is_waited_for_again(tmp_path, monkeypatch):
    """TIMEOUT, then requeued (PENDING): the grace restarts, so the later COMPLETED whose result
    file lags a second is not taken for a job that ended without one."""
    jobs = fake_jobs(tmp_path, 1)
    timeline = [{"7_0": ("RUNNING", "None")}, {"7_0": ("TIMEOUT", "None")}, {"7_0": ("PENDING", "BeginTime")},
                {"7_0": ("RUNNING", "None")}, {"7_0": ("COMPLETED", "None")}, {"7_0": ("COMPLETED", "None")}, "result"]
    cluster = Cluster(monkeypatch, timeline)

    def squeue_then_result(array):
        answer = cluster.squeue(array)
        if answer == "result":
            jobs[0].paths.result_pickle.write_bytes(b"x")
            return {"7_0": ("COMPLETED", "None")}
        return answer

    monkeypatch.setattr(slurm, "task_states", squeue_then_result)
    assert slurm_launch.wait(jobs, WATCH) == {0: None}
    assert cluster.calls == 7


def test_without_accounting_a_forgotten_job_ends_the_wait_naming_sacct_s_error(tmp_path, monkeypatch):
    jobs = fake_jobs(tmp_path, 1)
    cluster = Cluster(monkeypatch, [{}])  # the controller no longer lists it; sacct fails
    ends = slurm_launch.wait(jobs, WATCH)
    assert ends[0].state == "UNKNOWN" and "sacct failed (sacct: error: Problem talking to the database)" in ends[0].message
    assert cluster.calls <= 5


def test_a_silent_controller_ends_the_wait_with_one_line(tmp_path, monkeypatch):
    cluster = Cluster(monkeypatch, [{"7_0": ("RUNNING", "None")}, None])
    with pytest.raises(slurm.SlurmError, match="has not answered squeue for 10s; job 7 may still run") as err:
        slurm_launch.wait(fake_jobs(tmp_path, 1), WATCH)
    assert "\n" not in str(err.value) and cluster.calls <= 14


def test_a_reason_that_never_clears_cancels_the_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "cluster_nodes", lambda: CPU)
    cluster = Cluster(monkeypatch, [{"7_0": ("PENDING", "Priority"), "7_1": ("PENDING", "Priority")},
                                    {"7_0": ("PENDING", "PartitionConfig"), "7_1": ("PENDING", "PartitionConfig")}])
    with pytest.raises(slurm.SlurmError) as err:
        slurm_launch.wait(fake_jobs(tmp_path, 2), WATCH, request(cpus_per_task=8))
    assert cluster.cancelled == ["7"]
    assert str(err.value) == (
        "SLURM will never start job 7_0: pending for PartitionConfig (the request exceeds every node of the partition; "
        "hydra.launcher: gpus_per_node=0, cpus_per_task=8, mem_gb=2, timeout_min=60; default partition 'debug': "
        "1 node(s), at most 2 CPUs, 23 GB, no GPU); cancelled the grid")


def test_the_error_line_of_a_job_s_traceback_is_kept():
    trace = ("Job (task=0) failed during processing with trace:\n----\nTraceback (most recent call last):\n"
             "  File \"x.py\", line 1\nsubmitit.core.utils.UncompletedJobError: Job not requeued because: timed-out "
             "too many times.\n----\nYou can check full logs")
    assert slurm_launch.last_error(trace) == ("submitit.core.utils.UncompletedJobError: Job not requeued because: "
                                              "timed-out too many times.")
