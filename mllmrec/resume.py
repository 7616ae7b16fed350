"""Resuming a run dir: the config fingerprint, the completed-run shortcut and the checkpoint to resume.

A run dir remembers the config it trained (``.config_fingerprint``: a hash of the job's config but
``RESUME_IGNORED``, and the config itself, so that a later run can say what changed). Rerunning the
same config with the same ``hydra.run.dir`` returns a completed run's metrics or continues from its
``checkpoints/last.ckpt`` (docs/cache.md); another config trains afresh and says why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mllmrec.cache import stable_hash
from mllmrec.errors import ConfigError
from mllmrec.files import write_text_atomic

log = logging.getLogger("mllmrec.train")


FINGERPRINT = ".config_fingerprint"
# keys that do not change what a run computes up to its last epoch: a run dir is resumed across them
# (``trainer.max_epochs``: a longer budget continues from the last checkpoint; docs/cache.md)
RESUME_IGNORED = ("resume", "trainer.enable_progress_bar", "trainer.max_epochs")


def _resume_view(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=False)
    for dotted in RESUME_IGNORED:
        *parents, leaf = dotted.split(".")
        node = container
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return container


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of the job's config but ``RESUME_IGNORED``: a run dir is only resumed by the same config."""
    return stable_hash(_resume_view(cfg))


def _budget(cfg: DictConfig) -> float:
    value = cfg.trainer.get("max_epochs")
    return float("inf") if value is None or int(value) < 0 else int(value)


def write_fingerprint(out_dir: Path, cfg: DictConfig, fingerprint: str) -> None:
    """The fingerprint and the config it hashes (so that a later run can name what changed)."""
    record = {"fingerprint": fingerprint, "config": _resume_view(cfg)}
    write_text_atomic(out_dir / FINGERPRINT, json.dumps(record, default=str))


def read_fingerprint(out_dir: Path) -> dict | None:
    path = out_dir / FINGERPRINT
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"fingerprint": text, "config": None}  # before the record


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config containers, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _config_change(cfg: DictConfig, out_dir: Path, fingerprint: str) -> str | None:
    """Why this run dir's checkpoints are of another config (``None``: same config)."""
    record = read_fingerprint(out_dir)
    if record is None or record["fingerprint"] == fingerprint:
        return None
    if record.get("config") is None:
        return "its config differs (recorded by an older version: keys unknown)"
    changes = changed_keys(record["config"], _resume_view(cfg))
    return "changed: " + ("; ".join(changes[:10]) + (f"; ... ({len(changes)} keys)" if len(changes) > 10 else "")
                          if changes else "the config hash differs")


def completed_result(cfg: DictConfig, out_dir: Path, fingerprint: str) -> dict | None:
    """The metrics of a completed run in ``out_dir`` that rerunning this config would reproduce:
    same config (``RESUME_IGNORED`` aside) and either the same ``trainer.max_epochs``, or a run
    that early stopping ended before any budget that is at least the epochs it trained."""
    previous = out_dir / "metrics.json"
    if cfg.get("resume", "auto") != "auto" or not previous.is_file():
        return None
    try:
        done = json.loads(previous.read_text())
    except ValueError:
        return None
    if done.get("status") != "completed" or done.get("config_fingerprint") != fingerprint:
        return None
    budget, before = _budget(cfg), done.get("max_epochs")
    if before is not None and budget == (float("inf") if before < 0 else before):
        log.info("%s already holds a completed run of this config (resume=never to train again)", out_dir)
        return done
    if done.get("stopped_early") and budget >= int(done.get("epochs", 0)):
        log.info("%s already holds a completed run of this config: early stopping ended it after %s epochs, so "
                 "trainer.max_epochs=%s changes nothing (resume=never to train again)", out_dir, done.get("epochs"),
                 cfg.trainer.max_epochs)
        return done
    return None


def resume_checkpoint(cfg: DictConfig, out_dir: Path, fingerprint: str) -> str | None:
    """The checkpoint to resume from: ``resume=auto`` (default) picks ``checkpoints/last.ckpt`` of
    this run dir when a previous attempt of the same config (``trainer.max_epochs`` aside) left one
    (rerun with the same ``hydra.run.dir``); ``resume=<ckpt or run dir>`` names one;
    ``resume=never`` starts afresh."""
    mode = cfg.get("resume", "auto")
    if mode in (None, False, "never", "false"):
        return None
    if mode in ("auto", True):
        change = _config_change(cfg, out_dir, fingerprint)
        if change is not None:
            log.warning("%s holds checkpoints of a different config: not resuming, training afresh (%s)", out_dir, change)
            return None
        candidates = [out_dir / "checkpoints" / "last.ckpt", out_dir / "checkpoints" / "best.ckpt"]
    else:
        path = Path(str(mode)).expanduser()
        candidates = [path / "checkpoints" / "last.ckpt", path / "checkpoints" / "best.ckpt"] if path.is_dir() else [path]
        if not any(c.is_file() for c in candidates):
            raise ConfigError("resume", f"no checkpoint at {path}")
    for cand in candidates:
        if not cand.is_file():
            continue
        try:  # a kill during a checkpoint write can leave it truncated: fall back to the other one
            state = torch.load(cand, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is skipped
            log.warning("resume: %s is unreadable (%s); trying the next one", cand, type(exc).__name__)
            continue
        trained = int(state.get("epoch", -1)) + 1
        if mode == "auto" and trained > _budget(cfg):
            log.warning("%s: not resuming, training afresh: trainer.max_epochs=%s is below the %d epochs %s has "
                        "trained", out_dir, cfg.trainer.max_epochs, trained, cand.name)
            return None
        log.info("resuming from %s (%d epochs trained; trainer.max_epochs=%s)", cand, trained, cfg.trainer.max_epochs)
        return str(cand)
    return None




def write_metrics(out_dir: Path, metrics: dict) -> None:
    """metrics.json, written atomically (a reader never sees half a file)."""
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
