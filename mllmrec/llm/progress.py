"""What a generating job tells the people and programs watching it: its progress file, the source
named in each saved answer, and SLURM's time-limit warning (SIGUSR2) held until the chunk in flight is
saved (:class:`HeldSignal`). Used by :mod:`mllmrec.llm.runner`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from mllmrec.files import write_text_atomic
from mllmrec.llm.settings import Selection

log = logging.getLogger("mllmrec.llm.runner")


def eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def job_source(selection: Selection) -> str:
    """Who generated an answer, as the merge run's summary names it: the shard, and the SLURM job
    (array task) and its run (``SLURM_RESTART_COUNT``: 0 first, 1 after one requeue), else the process."""
    who = f"shard {selection.shard} of {selection.num_shards}" if selection.shard is not None else "unsharded run"
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        name = f"{array}_{task}" if array and task else job
        return f"{who}, SLURM job {name} run {int(os.environ.get('SLURM_RESTART_COUNT') or 0)}"
    return f"{who}, pid {os.getpid()}"


def progress_file(stage: str) -> Path | None:
    """``llm-<stage>-progress.json`` in the Hydra job's output folder (None outside a Hydra job): the
    SLURM launcher names what a shard that failed for good left undone from it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir) / f"llm-{stage}-progress.json"
    except Exception:  # noqa: BLE001 - no Hydra job: no progress file
        pass
    return None


class Progress:
    """The job's progress file, rewritten atomically at each chunk's start and end."""

    def __init__(self, path: Path | None, stage: str, selection: Selection, total: int, chunk: int, source: str):
        self.path = path
        self.state = {"stage": stage, "shard": selection.shard, "num_shards": selection.num_shards,
                      "requests": total, "saved": 0, "chunk_size": chunk, "source": source}

    def update(self, **changes) -> None:
        self.state.update(changes, updated_at=round(time.time(), 1))
        if self.path is not None:
            try:
                write_text_atomic(self.path, json.dumps(self.state, indent=1))
            except OSError as exc:  # progress is informative; generation goes on
                log.debug("progress file %s: %s", self.path, exc)


class HeldSignal:
    """While chunks are generated, SIGUSR2 (SLURM's warning before the time limit, on which
    submitit requeues the job and exits at once) is held until the chunk in flight is saved, then
    handed to the handler that was installed: a timed-out shard loses no answer it generated, and
    its requeued run sends only the others. Only where a handler is installed (a submitit job) and
    in the main thread; elsewhere nothing changes. A chunk that outlives the time left after the
    signal (``hydra.launcher.signal_delay_s``) is lost with the job, and the launcher names it."""

    SIGNAL = getattr(signal, "SIGUSR2", None)
    active: "HeldSignal | None" = None  # the one holding the signal now (tests wait on it)

    def __init__(self):
        self.original = None
        self.received: float | None = None

    def __enter__(self) -> "HeldSignal":
        HeldSignal.active = self
        if self.SIGNAL is not None and threading.current_thread() is threading.main_thread():
            current = signal.getsignal(self.SIGNAL)
            if callable(current):
                self.original = current
                signal.signal(self.SIGNAL, self._hold)
        return self

    @contextlib.contextmanager
    def shielding_children(self):
        """Processes started in here (vLLM's engine core and workers) inherit SIGUSR2 blocked: SLURM
        signals every process of the job, and theirs would die of it (its default action) in the
        middle of a chunk. This process gets a signal that came meanwhile once it is unblocked."""
        if self.original is None or not hasattr(signal, "pthread_sigmask"):
            yield
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {self.SIGNAL})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {self.SIGNAL})

    def _hold(self, signum, frame) -> None:
        if self.received is None:
            self.received = time.time()

    def hand_over(self, stage: str, saved: int, total: int) -> None:
        """Restore the job's handler and call it with the held signal (submitit: requeue, exit)."""
        original, self.original = self.original, None
        signal.signal(self.SIGNAL, original)
        log.warning("%s: SIGUSR2 (the time limit is near) came %.0f s ago, held until the chunk in flight was saved; "
                    "%d of %d answers are saved: handing the signal to the job's handler (requeue, then resume)",
                    stage, time.time() - self.received, saved, total)
        original(self.SIGNAL, None)

    def __exit__(self, *exc) -> bool:
        HeldSignal.active = None
        if self.original is not None:
            signal.signal(self.SIGNAL, self.original)
            self.original = None
        return False
