"""Entry point: ``python -m mllmrec.train [overrides] [-m]``.

Runs the stages it needs (reusing cached artifacts), trains with early stopping on validation
Recall@20, tests the best-validation checkpoint and writes ``metrics.json`` into the run dir.
Returns ``val/recall@20`` to Hydra so that sweepers can optimise it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from mllmrec import config as mconfig
from mllmrec.cache import stable_hash
from mllmrec.errors import ConfigError, MLLMRecError, one_line, report_errors
from mllmrec.files import write_text_atomic
from mllmrec.launch import trainer_placement
from mllmrec.loggers import build_loggers, finish_loggers
from mllmrec.llm.runner import ShardDone
from mllmrec.pipeline import Inputs, build_inputs, load_data, modality_inputs

log = logging.getLogger("mllmrec.train")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch 2.13
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # batches are prebuilt tensors


def write_metrics(out_dir: Path, metrics: dict) -> None:
    """metrics.json, written atomically (a reader never sees half a file)."""
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))


def _instantiate_group(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not launched by Hydra
        return Path.cwd()


def prepare_inputs(cfg: DictConfig) -> Inputs:
    """Data plus the inputs the model class declares it needs (``needs``, see :mod:`mllmrec.model`):
    ``"features"``: the stage artifacts (reason -> encode -> graph); ``"modalities"``: the item
    modality features; ``"ids"``: the interactions only."""
    needs = get_class(cfg.model._target_).needs
    if needs == "features":
        return build_inputs(cfg)
    if needs == "modalities":
        return modality_inputs(cfg)
    mconfig.validate(cfg)
    return Inputs(load_data(cfg))


def build_model(cfg: DictConfig, inputs: Inputs) -> pl.LightningModule:
    """``cfg.model`` instantiated (its ``optimizer`` node as a factory) and called with ``inputs``."""
    if "optimizer" not in cfg.model:
        raise ConfigError("model.optimizer", "missing: every model needs an optimizer node (conf/model/*.yaml)")
    return instantiate(cfg.model, _partial_=True)(inputs)


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


def train(cfg: DictConfig) -> dict:
    out_dir = run_dir()
    fingerprint = config_fingerprint(cfg)
    done = completed_result(cfg, out_dir, fingerprint)
    if done is not None:
        return done
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    inputs = prepare_inputs(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = instantiate(cfg.data).attach(inputs.data)
    model = build_model(cfg, inputs)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress-bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    loggers = build_loggers(cfg)
    metrics: dict = {}
    try:
        metrics = _fit_and_test(cfg, inputs, datamodule, model, callbacks, loggers, out_dir, fingerprint)
    finally:
        finish_loggers(loggers, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _fit_and_test(cfg, inputs, datamodule, model, callbacks, loggers, out_dir: Path, fingerprint: str) -> dict:
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_placement(cfg))

    resume_from = resume_checkpoint(cfg, out_dir, fingerprint)
    write_fingerprint(out_dir, cfg, fingerprint)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    fit_seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise SystemExit(130)

    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    test = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False)[0]
    epochs = int(trainer.current_epoch)
    metrics = {
        "status": "completed",
        **{k: v for k, v in model.best.items() if k.startswith("val/")},
        **{k: float(v) for k, v in test.items()},
        "best_epoch": int(model.best["epoch"]),
        "epochs": epochs,
        "fit_seconds": round(fit_seconds, 3),
        "seconds_per_epoch": round(fit_seconds / max(epochs, 1), 4),
        "checkpoint": ckpt,
        "resumed_from": resume_from,
        "config_fingerprint": fingerprint,
        "max_epochs": int(cfg.trainer.max_epochs) if cfg.trainer.get("max_epochs") is not None else -1,
        "stopped_early": any(getattr(c, "stopped_epoch", 0) > 0 for c in trainer.early_stopping_callbacks),
        "dataset": cfg.dataset.name,
        "device": str(trainer.strategy.root_device),
        "artifacts": {name: str(a.path) for name, a in inputs.artifacts.items()},
    }
    write_metrics(out_dir, metrics)
    log.info(
        "%s: best epoch %d of %d | val R@20 %.4f | test R@10 %.4f R@20 %.4f N@10 %.4f N@20 %.4f | fit %.1fs (%.3fs/epoch) | %s",
        cfg.dataset.name, metrics["best_epoch"], epochs, metrics["val/recall@20"], metrics["test/recall@10"],
        metrics["test/recall@20"], metrics["test/ndcg@10"], metrics["test/ndcg@20"], fit_seconds,
        metrics["seconds_per_epoch"], out_dir / "metrics.json",
    )
    return metrics


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="train")
@report_errors
def main(cfg: DictConfig) -> float:
    try:
        return float(train(cfg)["val/recall@20"])
    except ShardDone as done:  # llm.shard: this job generated its share; training waits for the merge
        log.info("%s", done)
        write_metrics(run_dir(), {"status": "shard_done", "message": str(done)})
        return float("nan")
    except Exception as exc:
        message = one_line(exc)
        write_metrics(run_dir(), {"status": "failed", "error": f"{type(exc).__name__}: {message}"})
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # keep the sweep going: the summary marks this job failed, the others' results stand
            log.error("job failed: %s", message, exc_info=not isinstance(exc, MLLMRecError))
            return float("nan")
        raise


if __name__ == "__main__":
    main()
