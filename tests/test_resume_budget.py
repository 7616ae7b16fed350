"""Resuming a run dir with a raised ``trainer.max_epochs``, and a damaged stage cache repaired by
the training entry point itself (the reproduction of issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_module, tiny_overrides

from mllmrec.resume import changed_keys, completed_result, config_fingerprint, resume_checkpoint, write_fingerprint


def test_changed_keys_names_each_difference():
    old = {"graph": {"k_c": 10, "alpha": 0.7}, "seed": 1, "model": {"lr": 0.001}}
    new = {"graph": {"k_c": 5, "alpha": 0.7}, "seed": 1, "model": {"lr": 0.001, "d": 64}}
    assert changed_keys(old, new) == ["graph.k_c: 10 -> 5", "model.d: '<absent>' -> 64"]
    assert changed_keys(old, old) == []


def test_fingerprint_ignores_max_epochs_only(compose_cfg):
    base = config_fingerprint(compose_cfg("trainer.max_epochs=3"))
    assert config_fingerprint(compose_cfg("trainer.max_epochs=300")) == base
    assert config_fingerprint(compose_cfg("trainer.max_epochs=3", "trainer.enable_progress_bar=false")) == base
    assert config_fingerprint(compose_cfg("trainer.max_epochs=3", "graph.k_c=5")) != base
    assert config_fingerprint(compose_cfg("trainer.max_epochs=3", "model.optimizer.lr=0.01")) != base


def _completed(out: Path, cfg, **fields):
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"status": "completed", "config_fingerprint": config_fingerprint(cfg), **fields}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_completed_run_is_returned_only_when_a_rerun_would_reproduce_it(compose_cfg, tmp_path, caplog):
    cfg40 = compose_cfg("trainer.max_epochs=40")
    fp = config_fingerprint(cfg40)
    hit_budget = tmp_path / "hit"
    _completed(hit_budget, cfg40, max_epochs=40, epochs=40, stopped_early=False)
    assert completed_result(cfg40, hit_budget, fp) is not None  # same budget: done
    assert completed_result(compose_cfg("trainer.max_epochs=80"), hit_budget, fp) is None  # more budget: resume
    assert completed_result(compose_cfg("trainer.max_epochs=40", "resume=never"), hit_budget, fp) is None

    early = tmp_path / "early"
    _completed(early, cfg40, max_epochs=40, epochs=25, stopped_early=True)
    with caplog.at_level("INFO"):
        assert completed_result(compose_cfg("trainer.max_epochs=80"), early, fp) is not None
    assert "early stopping ended it after 25 epochs" in caplog.text
    assert completed_result(compose_cfg("trainer.max_epochs=25"), early, fp) is not None
    assert completed_result(compose_cfg("trainer.max_epochs=20"), early, fp) is None  # would stop sooner

    other = compose_cfg("trainer.max_epochs=40", "graph.k_c=5")
    assert completed_result(other, hit_budget, config_fingerprint(other)) is None


def test_other_config_changes_start_afresh_naming_the_keys(compose_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"unused: never loaded")
    old = compose_cfg("trainer.max_epochs=3")
    write_fingerprint(out, old, config_fingerprint(old))
    new = compose_cfg("trainer.max_epochs=3", "graph.k_c=5", "model.optimizer.lr=0.01")
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(new, out, config_fingerprint(new)) is None
    line = [r.getMessage() for r in caplog.records if "not resuming" in r.getMessage()]
    assert len(line) == 1 and "graph.k_c: 10 -> 5" in line[0] and "model.optimizer.lr: 0.001 -> 0.01" in line[0], line
    # an older run dir whose fingerprint file holds only the hash: afresh, saying the keys are unknown
    (out / ".config_fingerprint").write_text("0123456789abcdef")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(new, out, config_fingerprint(new)) is None
    assert "keys unknown" in caplog.text


def _args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(out, "callbacks.early_stopping.stopping_step=100", "logger=none",
                          "callbacks.progress_bar.refresh_rate=0", *extra, data_dir=tiny_dir, run=out / "run")


@pytest.mark.slow
def test_damaged_cache_is_rebuilt_and_a_raised_budget_resumes(tiny_dir, tmp_path):
    first = run_module("mllmrec.train", *_args(tiny_dir, tmp_path, "trainer.max_epochs=1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    done = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert done["epochs"] == 1 and done["max_epochs"] == 1 and done["stopped_early"] is False

    # the reproduction: an embeddings.npy cut short in place (interrupted rsync, full disk)
    items = Path(done["artifacts"]["encode/items"])
    blob = (items / "embeddings.npy").read_bytes()
    (items / "embeddings.npy").write_bytes(blob[: len(blob) // 2])

    second = run_module("mllmrec.train", *_args(tiny_dir, tmp_path, "trainer.max_epochs=2"), cwd=tmp_path)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    warnings = [ln for ln in log.splitlines() if "is damaged" in ln]
    assert len(warnings) == 1 and items.name in warnings[0] and "embeddings.npy" in warnings[0], warnings
    assert "Traceback" not in log
    assert (items / "embeddings.npy").read_bytes() == blob  # rebuilt, identical
    assert len(list(items.parent.glob(f"{items.name}.damaged-*"))) == 1
    assert "resuming from" in log
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["status"] == "completed" and again["epochs"] == 2 and again["resumed_from"].endswith("last.ckpt")
