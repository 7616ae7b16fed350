"""Entry point: ``python -m mllmrec.train [overrides] [-m]``.

Runs the stages it needs (reusing cached artifacts), trains with early stopping on validation
Recall@20, tests the best-validation checkpoint and writes ``metrics.json`` into the run dir.
Returns ``val/recall@20`` to Hydra so that sweepers can optimise it.
"""

from __future__ import annotations

import inspect
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
from mllmrec.loggers import build_loggers, finish_loggers
from mllmrec.pipeline import Inputs, build_inputs, load_data

log = logging.getLogger("mllmrec.train")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch 2.13
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # batches are prebuilt tensors


def write_metrics(out_dir: Path, metrics: dict) -> None:
    """metrics.json, written atomically (a reader never sees half a file)."""
    tmp = out_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out_dir / "metrics.json")


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
    """Data plus, for feature-based models, the stage artifacts (reason -> encode -> graph)."""
    if cfg.model.get("needs_modalities", False):  # multimodal baselines: raw item modality features
        from mllmrec.mm.features import modality_inputs

        return modality_inputs(cfg)
    if cfg.model.get("needs_features", True):
        return build_inputs(cfg)
    mconfig.validate(cfg)
    return Inputs(load_data(cfg))


def build_model(cfg: DictConfig, inputs: Inputs) -> pl.LightningModule:
    """Instantiate ``cfg.model`` with whatever data-derived arguments its class takes."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("needs_features", None)
    model_cfg.pop("needs_modalities", None)
    target = get_class(model_cfg["_target_"])
    data = inputs.data
    available = {
        "n_users": data.n_users,
        "n_items": data.n_items,
        "train_matrix": data.train_matrix,
        "user_features": None if inputs.user_features is None else torch.from_numpy(inputs.user_features),
        "item_features": None if inputs.item_features is None else torch.from_numpy(inputs.item_features),
        "modalities": inputs.modalities,
        "graph_cfg": OmegaConf.to_container(cfg.graph, resolve=True),
    }
    accepted = inspect.signature(target.__init__).parameters
    extra = {k: v for k, v in available.items() if k in accepted and k not in model_cfg}
    return instantiate(model_cfg, **extra)


FINGERPRINT = ".config_fingerprint"


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of the job's config (``resume`` aside): a run dir is only resumed by the same config."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("resume", None)
    container.get("trainer", {}).pop("enable_progress_bar", None)  # display only
    return stable_hash(container)


def same_config(out_dir: Path, fingerprint: str) -> bool:
    path = out_dir / FINGERPRINT
    return not path.is_file() or path.read_text().strip() == fingerprint


def resume_checkpoint(cfg: DictConfig, out_dir: Path, fingerprint: str) -> str | None:
    """The checkpoint to resume from: ``resume=auto`` (default) picks ``checkpoints/last.ckpt`` of
    this run dir when a previous attempt left one (rerun with the same ``hydra.run.dir``);
    ``resume=<ckpt or run dir>`` names one; ``resume=never`` starts afresh."""
    mode = cfg.get("resume", "auto")
    if mode in (None, False, "never", "false"):
        return None
    if mode in ("auto", True):
        if not same_config(out_dir, fingerprint):
            log.warning("%s holds checkpoints of a different config: not resuming, training afresh", out_dir)
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
            torch.load(cand, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is skipped
            log.warning("resume: %s is unreadable (%s); trying the next one", cand, type(exc).__name__)
            continue
        log.info("resuming from %s", cand)
        return str(cand)
    return None


def train(cfg: DictConfig) -> dict:
    out_dir = run_dir()
    fingerprint = config_fingerprint(cfg)
    previous = out_dir / "metrics.json"
    if cfg.get("resume", "auto") == "auto" and previous.is_file():
        done = json.loads(previous.read_text())
        if done.get("status") == "completed" and done.get("config_fingerprint") == fingerprint:
            log.info("%s already holds a completed run of this config (resume=never to train again)", out_dir)
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
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    resume_from = resume_checkpoint(cfg, out_dir, fingerprint)
    (out_dir / FINGERPRINT).write_text(fingerprint)
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
