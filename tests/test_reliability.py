"""Reliability: resume after kill -9, concurrent cache publishing, settings refused up front,
secrets never written to disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_module, tiny_overrides

TEST_KEYS = ("test/recall@10", "test/recall@20", "test/ndcg@10", "test/ndcg@20")


def train_args(tiny_dir: Path, out: Path, run: str, *extra: str) -> list[str]:
    return tiny_overrides(out, "trainer.max_epochs=40", "callbacks.early_stopping.stopping_step=100", "logger=none",
                          "callbacks.progress_bar.refresh_rate=0", *extra, data_dir=tiny_dir, run=out / run)


@pytest.mark.slow
def test_kill9_during_training_then_resume_gives_the_same_metrics(tiny_dir, tmp_path):
    full = run_module("mllmrec.train", *train_args(tiny_dir, tmp_path, "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())

    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "mllmrec.train", *train_args(tiny_dir, tmp_path, "killed")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"training ended (rc={proc.returncode}) before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = run_module("mllmrec.train", *train_args(tiny_dir, tmp_path, "killed"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    got = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert got["resumed_from"]
    assert got["epochs"] == expected["epochs"] == 40
    assert got["best_epoch"] == expected["best_epoch"]
    for key in (*TEST_KEYS, "val/recall@20"):
        assert got[key] == expected[key], key

    # a third invocation finds the run complete and trains nothing
    again = run_module("mllmrec.train", *train_args(tiny_dir, tmp_path, "killed"), cwd=tmp_path)
    assert again.returncode == 0
    assert "already holds a completed run" in again.stdout + again.stderr

    # the same run dir with another setting is not mistaken for it: it trains afresh
    other = run_module("mllmrec.train", *train_args(tiny_dir, tmp_path, "killed", "trainer.max_epochs=3"), cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "already holds" not in other.stdout + other.stderr
    assert "not resuming" in other.stdout + other.stderr
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["epochs"] == 3


def test_two_builders_of_one_artifact_build_once_and_leave_one_complete_copy(tmp_path):
    """Two threads (separate lock descriptors, as two processes) want one key: the key's lock lets
    one build while the other waits and then reuses it (processes: tests/test_cache_integrity.py)."""
    from mllmrec.cache import ArtifactCache

    cache = ArtifactCache(tmp_path, "d")
    start = threading.Barrier(2)
    results, errors, builds = [], [], []

    def build(out):
        builds.append(1)
        (out / "x.txt").write_text("payload")
        time.sleep(0.3)  # the other thread asks for the key meanwhile
        return {"rows": 1}

    def worker():
        try:
            start.wait(timeout=10)
            results.append(cache.fetch("stage", {"a": 1}, {"in": "h"}, build))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(builds) == 1
    assert len(results) == 2 and results[0].path == results[1].path
    assert sorted(r.reused for r in results) == [False, True]
    stage_dir = tmp_path / "d" / "stage"
    entries = sorted(p.name for p in stage_dir.iterdir())
    assert entries == sorted([results[0].key, f".{results[0].key}.lock"]), entries  # no temp folder left behind
    assert (results[0].path / "x.txt").read_text() == "payload"
    assert json.loads((results[0].path / "manifest.json").read_text())["counts"] == {"rows": 1}


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, key",
    # the full range table is checked in-process in test_pipeline.py; here, the CLI path
    [("graph.alpha=1.5", "graph.alpha"), ("graph.layers=-1", "graph.layers"), ("data.batch_size=0", "data.batch_size")],
)
def test_out_of_range_settings_are_refused_before_any_work(tiny_dir, tmp_path, override, key):
    proc = run_module("mllmrec.train", *train_args(tiny_dir, tmp_path, "run", override), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: config ") and f"'{key}'" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing was computed


@pytest.mark.slow
def test_wandb_key_never_written(tiny_dir, tmp_path, monkeypatch):
    secret = "wandb-fake-key-0123456789abcdef0123456789abcdef"
    env = dict(os.environ, WANDB_API_KEY=secret, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    args = train_args(tiny_dir, tmp_path, "run", "logger=wandb", "trainer.max_epochs=2")
    proc = subprocess.run([sys.executable, "-m", "mllmrec.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run written"
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert secret not in proc.stdout + proc.stderr


def test_training_gathers_have_a_deterministic_backward():
    """The towers' outputs are gathered for repeated users/items; with several CPU threads the
    backward of plain advanced indexing adds repeated rows in a varying order (runs of one config
    drifted apart on office); ``model.rows`` must give bit-identical gradients every time."""
    import torch

    from mllmrec.models.layers import rows

    torch.manual_seed(0)
    table = torch.randn(1500, 64, requires_grad=True)
    index = torch.randint(1500, (2048,))
    grad = torch.randn(2048, 64)

    def backward():
        table.grad = None
        rows(table, index).backward(grad)
        return table.grad.clone()

    first = backward()
    assert all(torch.equal(first, backward()) for _ in range(30))
    torch.testing.assert_close(rows(table, index), table[index])


def test_failed_job_message_keeps_the_cause_on_one_line():
    from hydra.errors import InstantiationException

    from mllmrec.errors import one_line

    exc = InstantiationException(
        "Error in call to target 'pytorch_lightning.trainer.trainer.Trainer':\n"
        "MisconfigurationException('bad trainer setting')\nfull_key: trainer"
    )
    msg = one_line(exc)
    assert "\n" not in msg
    assert "Trainer':" in msg and "bad trainer setting" in msg  # the cause, not only the wrapper
    assert one_line(ValueError()) == "ValueError"
    assert len(one_line(ValueError("x" * 2000))) < 520
