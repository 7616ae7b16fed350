"""What a SLURM cluster offers and where its jobs stand: ``sinfo``, ``squeue`` and ``sacct``.

Used by the SLURM launcher (``hydra/launcher=slurm``, :mod:`mllmrec.slurm_launch`) to refuse,
before submitting, a request that no node can ever meet (a GPU on a cluster without one, more
CPUs, memory or time than any node or partition has) with one line naming the setting, what the
cluster offers and the fix; and, while the grid runs, to read each array task's state from the
controller (``squeue``, which also lists jobs that ended in the last ``MinJobAge`` seconds) and,
failing that, from accounting (``sacct``, which fails where slurmdbd is not set up).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from mllmrec.errors import MLLMRecError

# states after which a task runs no more (sacct may add " by <uid>" to CANCELLED)
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# pending reasons that never clear by waiting: the request exceeds what the partition allows
NEVER = {
    "PartitionConfig": "the request exceeds every node of the partition",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "hydra.launcher.timeout_min above the partition's time limit",
    "BadConstraints": "no node has the requested features or resources",
    "InvalidAccount": "hydra.launcher.account is not a valid account",
    "InvalidQOS": "hydra.launcher.qos is not a valid QOS",
}
COMMAND_TIMEOUT_S = 30


class SlurmError(MLLMRecError):
    """SLURM cannot run the grid (or cannot be asked); the message is one line."""


def run(args: list[str], timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a SLURM command; status 127 when missing, 124 on timeout."""
    if shutil.which(args[0]) is None:
        return 127, "", f"{args[0]}: command not found"
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"{args[0]}: no answer within {timeout:g}s"
    return proc.returncode, proc.stdout, proc.stderr.strip()


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    default: bool  # the partition is the cluster's default
    cpus: int
    mem_mb: int
    gpus: int
    time_limit_min: float  # the partition's; inf when unlimited


def parse_gpus(gres: str) -> int:
    """GPUs in a ``sinfo %G`` field: ``gpu:4``, ``gpu:a100:2(S:0-1),gpu:v100:1`` -> 4, 3; ``(null)`` -> 0."""
    total = 0
    for item in gres.split(","):
        if item.startswith("gpu:"):
            count = re.match(r"(\d+)", item.split("(")[0].rsplit(":", 1)[-1])
            total += int(count.group(1)) if count else 0
    return total


def parse_time_min(text: str) -> float:
    """A SLURM time limit (``infinite``, ``60``, ``1:00:00``, ``2-00:00:00``) in minutes."""
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return float("inf")
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def cluster_nodes() -> list[Node]:
    """Every (node, partition) pair ``sinfo`` lists; SlurmError when sinfo is missing or fails."""
    rc, out, err = run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G|%l"])
    if rc == 127:
        raise SlurmError("hydra/launcher=slurm needs SLURM's commands (sinfo, sbatch) on PATH: run on the "
                         "cluster's login node, or start a local one-node cluster with `make slurm-up`")
    if rc != 0:
        raise SlurmError(f"sinfo failed, so the cluster cannot be asked what it offers: {first_line(err) or rc}")
    nodes = []
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        part, name, cpus, mem, gres, limit = fields
        nodes.append(Node(name, part.rstrip("*"), part.endswith("*"), int(cpus.rstrip("+")),
                          int(mem.rstrip("+")), parse_gpus(gres), parse_time_min(limit)))
    return nodes


def offer(nodes: list[Node], where: str) -> str:
    """What ``nodes`` offer, in words: node count, the most CPUs, memory and GPUs, the time limit."""
    gpus = max(n.gpus for n in nodes)
    limit = min(n.time_limit_min for n in nodes)
    return (f"{where}: {len({n.name for n in nodes})} node(s), at most {max(n.cpus for n in nodes)} CPUs, "
            f"{max(n.mem_mb for n in nodes) // 1024} GB, {f'{gpus} GPUs' if gpus else 'no GPU'}"
            + ("" if limit == float("inf") else f", time limit {limit:g} min"))


def target_nodes(nodes: list[Node], partition: str | None) -> tuple[list[Node], str]:
    """The nodes of ``partition`` (the default one when None) and the partition in words."""
    if not partition:
        chosen = [n for n in nodes if n.default]
        return chosen, f"default partition '{chosen[0].partition}'" if chosen else "the cluster"
    wanted = partition.split(",")
    chosen = [n for n in nodes if n.partition in wanted]
    if not chosen:
        have = ", ".join(sorted({n.partition + ("*" if n.default else "") for n in nodes}))
        raise SlurmError(f"config 'hydra.launcher.partition': no partition '{partition}' on this cluster "
                         f"(it has: {have}; * = default)")
    return chosen, f"partition '{partition}'"


def request_problems(params: dict, nodes: list[Node]) -> list[str]:
    """What in the launcher's ``params`` no node of the target partition can ever give (one phrase each)."""
    tasks = int(params.get("tasks_per_node") or 1)
    cpus = int(params.get("cpus_per_task") or 1) * tasks
    gpus = int(params.get("gpus_per_node") or 0) or int(params.get("gpus_per_task") or 0) * tasks
    gpus = gpus or parse_gpus(str(params.get("gres") or ""))
    mem_mb = float(params.get("mem_gb") or 0) * 1024
    minutes = float(params.get("timeout_min") or 0)
    gpu_key = "gpus_per_node" if params.get("gpus_per_node") else "gpus_per_task" if params.get("gpus_per_task") else "gres"
    fits = [n for n in nodes if n.cpus >= cpus and n.mem_mb >= mem_mb and n.gpus >= gpus]
    if fits and minutes <= max(n.time_limit_min for n in fits):
        return []
    problems = []
    most_gpus = max(n.gpus for n in nodes)
    if gpus > most_gpus:
        fix = "no node has a GPU: set 0" if most_gpus == 0 else f"set at most {most_gpus}"
        problems.append(f"hydra.launcher.{gpu_key}={gpus}: {fix}")
    if cpus > max(n.cpus for n in nodes):
        key = "cpus_per_task" + (f" x tasks_per_node={tasks}" if tasks > 1 else "")
        problems.append(f"hydra.launcher.{key}={cpus}: set at most {max(n.cpus for n in nodes) // tasks}")
    if mem_mb > max(n.mem_mb for n in nodes):
        problems.append(f"hydra.launcher.mem_gb={params.get('mem_gb')}: set at most {max(n.mem_mb for n in nodes) // 1024}")
    if minutes > max(n.time_limit_min for n in nodes):
        problems.append(f"hydra.launcher.timeout_min={minutes:g}: set at most {max(n.time_limit_min for n in nodes):g}")
    return problems or [f"no single node has {cpus} CPUs, {mem_mb / 1024:g} GB and {gpus} GPU(s) together"]


def check_request(params: dict) -> None:
    """Raise SlurmError (one line) when no node of the target partition can ever run one job of ``params``."""
    nodes, where = target_nodes(cluster_nodes(), params.get("partition"))
    if not nodes:
        raise SlurmError(f"sinfo lists no node in {where}")
    problems = request_problems(params, nodes)
    if problems:
        raise SlurmError(f"SLURM can never run this request ({offer(nodes, where)}): " + "; ".join(problems))


def task_states(array_id: str) -> dict[str, tuple[str, str]] | None:
    """{job id (``<array>_<index>``, or ``<id>`` for a lone job): (state, pending reason)} from the
    controller; {} once it has forgotten them; None when squeue fails (the controller does not answer)."""
    rc, out, err = run(["squeue", "-h", "-t", "all", "--array", "-j", array_id, "-o", "%i|%T|%r"])
    if rc != 0:
        return {} if "Invalid job id" in err else None
    return _parse_states(out, array_id)


def accounting_states(array_id: str) -> tuple[dict[str, tuple[str, str]], str]:
    """({job id: (state, "")}, "") from ``sacct``, or ({}, why) when accounting does not answer."""
    rc, out, err = run(["sacct", "-n", "-P", "-X", "-j", array_id, "-o", "JobID,State"])
    if rc != 0:
        return {}, first_line(err) or f"sacct exited {rc}"
    return _parse_states(out, array_id, reason_field=False), ""


def _parse_states(out: str, array_id: str, reason_field: bool = True) -> dict[str, tuple[str, str]]:
    states: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        job, state = fields[0], fields[1].split()[0] if len(fields) > 1 and fields[1] else ""
        reason = fields[2] if reason_field and len(fields) > 2 else ""
        head, _, index = job.partition("_")
        if head != array_id or not (index.isdigit() or job == array_id):
            continue  # pending ranges (5_[2-3]) are listed per task by squeue --array; sacct steps skipped
        states[job] = (state, reason)
    return states


def cancel(array_id: str) -> None:
    run(["scancel", array_id])
