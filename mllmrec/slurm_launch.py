"""The grid on SLURM (``hydra/launcher=slurm``): check, submit, watch, and mark what SLURM ended.

hydra-submitit-launcher submits the grid as one array and then waits on each task's result
file, asking ``sacct`` for the state. On a real cluster that goes wrong in three ways: a task
cancelled from outside makes it raise (no summary for the tasks that finished), a cluster
without accounting (``sacct`` fails) makes it wait for ever, and a request no node can meet
pends for ever. :func:`launch` replaces its wait:

- before submitting, :func:`mllmrec.slurm.check_request` compares the request with ``sinfo``
  (one line naming the setting, what the cluster offers and the fix; exit 2);
- it polls the controller (``squeue``, which also lists tasks that ended in the last
  ``MinJobAge`` seconds), and ``sacct`` only for a task the controller has forgotten;
- a task pending for a reason that never clears (``PartitionConfig``, ...) cancels the array
  with one line; a controller silent for ``controller_timeout_s`` ends the wait with one line;
- a task that ended without a result (CANCELLED, NODE_FAIL, OUT_OF_MEMORY, TIMEOUT, ...) gets
  ``metrics.json`` with ``status`` = SLURM's state in its job folder (and the folder's
  ``.hydra/`` when it never started), so the multirun summary lists it, the others' results
  stand, and the command exits 1. Rerun the command with the same ``hydra.sweep.dir``: the
  completed jobs return their metrics (``resume=auto``), the marked ones train (from their
  ``last.ckpt`` if they had one).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from mllmrec import slurm
from mllmrec.errors import one_line
from mllmrec.files import write_text_atomic

log = logging.getLogger("mllmrec.slurm")


@dataclass(frozen=True)
class Watch:
    """How the launcher watches the array (``hydra.launcher.<key>``, see conf/hydra/launcher/slurm.yaml)."""

    poll_s: float = 5.0  # seconds between two squeue calls
    end_grace_s: float = 15.0  # after SLURM says a task ended, how long its result file may lag (shared FS;
    # submitit's own wait for a result file)
    controller_timeout_s: float = 300.0  # squeue failing this long ends the wait
    check_cluster: bool = True  # compare the request with sinfo before submitting


@dataclass(frozen=True)
class End:
    """A task that ended without a result: SLURM's state and what to tell the user."""

    state: str
    message: str


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, watch: Watch) -> list[JobReturn]:
    """Run the jobs as one SLURM array; a JobReturn per job, SLURM-ended ones marked in their folder."""
    try:
        if watch.check_cluster:
            slurm.check_request(launcher.params)
        jobs = submit(launcher, job_overrides, initial_job_idx)
        ends = wait(jobs, watch, launcher.params)
    except slurm.SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    returns = []
    for i, (job, overrides) in enumerate(zip(jobs, job_overrides)):
        end = ends.get(i)
        if end is None:
            try:
                returns.append(job.results()[0])
                continue
            except Exception as exc:  # noqa: BLE001 - submitit's error outcome: the process failed outside train()
                text = last_error(str(exc))
                end = End("TIMEOUT" if "timed-out" in text else "FAILED", f"SLURM job {job.job_id}: {text}")
        returns.append(mark(launcher, list(overrides), initial_job_idx + i, job.job_id, end))
    return returns


def last_error(trace: str) -> str:
    """The ``SomeError: message`` line of a traceback (its last), else its first line."""
    found = [line.strip() for line in trace.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line.strip())]
    return found[-1] if found else one_line(trace)


def executor(launcher):
    """submitit's SLURM executor with the launcher's parameters (as hydra-submitit-launcher builds it)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(launcher.params)
    ex = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                               slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return ex


def submit(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """sbatch the array; a refusal becomes one line with sbatch's reason."""
    from submitit.core.utils import FailedJobError

    ex = executor(launcher)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    log.info("SLURM sweep output dir: %s", sweep_dir)
    params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr; it goes in our one line
        try:
            jobs = ex.map_array(launcher, *zip(*params))
        except FailedJobError as exc:
            raise slurm.SlurmError(f"sbatch refused the grid: {one_line(exc)}") from None
    log.info("submitted %d job(s) as SLURM job %s (logs: %s)", len(jobs), jobs[0].job_id.split("_")[0],
             jobs[0].paths.folder.parent)
    return jobs


def _never(job, reason: str, params: dict) -> slurm.SlurmError:
    asked = ", ".join(f"{k}={params.get(k)}" for k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb",
                                                         "timeout_min") if params.get(k) is not None)
    try:
        offer = "; " + slurm.offer(*slurm.target_nodes(slurm.cluster_nodes(), params.get("partition")))
    except slurm.SlurmError:
        offer = ""
    return slurm.SlurmError(f"SLURM will never start job {job.job_id}: pending for {reason} ({slurm.NEVER[reason]}; "
                            f"hydra.launcher: {asked}{offer}); cancelled the grid")


def wait(jobs: list, watch: Watch, params: dict | None = None) -> dict[int, End | None]:
    """Until every task has a result or has ended without one: {task: None (result) or End}."""
    array_id = jobs[0].job_id.split("_")[0]
    ends: dict[int, End | None] = {}
    ended_at: dict[int, float] = {}
    silent_since = None
    reasons: dict[int, str] = {}
    while True:
        states = slurm.task_states(array_id)
        now = time.monotonic()
        if states is None:
            silent_since = silent_since or now
            if now - silent_since > watch.controller_timeout_s:
                raise slurm.SlurmError(f"SLURM's controller has not answered squeue for {watch.controller_timeout_s:g}s; "
                                       f"job {array_id} may still run: rerun the same command with the same "
                                       f"hydra.sweep.dir later to collect it")
        else:
            silent_since = None
        accounting: tuple[dict, str] | None = None
        for i, job in enumerate(jobs):
            if i in ends:
                continue
            if job.paths.result_pickle.exists():
                ends[i] = None
                continue
            if states is None:
                continue
            state, reason = states.get(job.job_id, ("", ""))
            if state == "PENDING" and reason in slurm.NEVER:
                slurm.cancel(array_id)
                raise _never(job, reason, params or {})
            if state == "PENDING" and reason not in ("", "None") and reasons.get(i) != reason:
                log.info("job %s pending: %s", job.job_id, reason)
            reasons[i] = reason
            if not state:  # the controller forgot it (ended more than MinJobAge ago): ask accounting
                accounting = accounting or slurm.accounting_states(array_id)
                state = accounting[0].get(job.job_id, ("", ""))[0]
            if state in slurm.TERMINAL or not state:
                if now - ended_at.setdefault(i, now) >= watch.end_grace_s:
                    ends[i] = _ended(job, state, accounting)
            else:
                ended_at.pop(i, None)  # requeued
        if len(ends) == len(jobs):
            return ends
        time.sleep(watch.poll_s)


def _ended(job, state: str, accounting: tuple[dict, str] | None) -> End:
    if state:
        return End(state, f"SLURM job {job.job_id} ended {state} without a result (see {job.paths.stderr})")
    why = accounting[1] if accounting and accounting[1] else "sacct does not know it either"
    return End("UNKNOWN", f"SLURM job {job.job_id} ended without a result; the controller no longer lists it and "
                          f"sacct failed ({why}) (see {job.paths.stderr})")


def sweep_config(launcher, overrides: list[str], num: int, job_id: str):
    """The job's config as the job itself composes it (hydra-submitit-launcher's ``__call__``)."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.id = job_id
        cfg.hydra.job.num = num
    return cfg


def job_dir(cfg) -> Path:
    """``hydra.sweep.dir/hydra.sweep.subdir`` resolved as ``hydra.core.utils.run_job`` resolves it."""
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    hydra_config.set_config(cfg)
    try:
        return Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    finally:
        hydra_config.cfg = saved


def llm_left(folder: Path) -> str:
    """What an LLM stage job (a shard) that ended without a result left undone, from the progress
    files the runner keeps in its folder (``llm-<stage>-progress.json``): "" when none."""
    said = []
    for path in sorted(folder.glob("llm-*-progress.json")):
        try:
            p = json.loads(path.read_text())
            total, saved = int(p["requests"]), int(p["saved"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if saved >= total:
            continue
        who = f"{p.get('stage')} shard {p['shard']} of {p['num_shards']}" if p.get("shard") is not None else p.get("stage")
        text = f"; {who}: {saved} of {total} answers saved, {total - saved} remain"
        if p.get("state") == "loading the engine":
            text += (" (it ended while the engine was loading: the time limit leaves too little for the engine and one "
                     "chunk; raise hydra.launcher.timeout_min)")
        elif p.get("state") == "generating" and p.get("chunk_started_at"):
            started = time.strftime("%H:%M:%S", time.localtime(float(p["chunk_started_at"])))
            text += (f" (a chunk of {p.get('chunk_requests')} requests started at {started} was never saved: if the "
                     f"time limit is too short for one chunk, lower llm.chunk_size={p.get('chunk_size')} or raise "
                     f"hydra.launcher.timeout_min)")
        said.append(text + "; rerun the same command: only they are generated")
    return "".join(said)


def mark(launcher, overrides: list[str], num: int, job_id: str, end: End) -> JobReturn:
    """Write ``metrics.json`` with ``status`` = SLURM's state into the job's folder (and the
    ``.hydra/`` files the summary reads, when the job never started); a JobReturn for Hydra."""
    cfg = sweep_config(launcher, overrides, num, job_id)
    out = job_dir(cfg)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    hydra_dir = out / str(cfg.hydra.output_subdir or ".hydra")
    if not (hydra_dir / "overrides.yaml").is_file():
        hydra_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(task_cfg))
        write_text_atomic(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["hydra"])))
        write_text_atomic(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(cfg.hydra.overrides.task))
    metrics_path = out / "metrics.json"
    try:
        before = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except ValueError:
        before = {}
    if before.get("status") != "completed":
        own = before.get("error") if "slurm_state" not in before else None  # not an earlier run's mark
        message = end.message + (f"; the job had written: {own}" if own else "") + llm_left(out)
        write_text_atomic(metrics_path, json.dumps({"status": end.state, "error": message, "slurm_job_id": job_id,
                                                    "slurm_state": end.state}, indent=2))
        log.error("job #%d (%s) %s: %s", num, " ".join(filter_overrides(overrides)), end.state, message)
    return JobReturn(overrides=overrides, cfg=task_cfg, hydra_cfg=cfg, working_dir=str(out),
                     task_name=str(cfg.hydra.job.name), status=JobStatus.COMPLETED, _return_value=float("nan"))
