"""Entry point: ``python -m mllmrec.train [overrides] [-m]``.

Runs the stages it needs (reusing cached artifacts), trains with early stopping on the validation
metric ``eval.valid_metric`` (default Recall@20), tests the best-validation checkpoint and writes
``metrics.json`` into the run dir. Returns ``val/<eval.valid_metric>`` to Hydra so that sweepers can
optimise it.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.distributed import RunDirCheck, check_supported, is_rank_zero, strategy_override
from mllmrec.errors import MLLMRecError, one_line, report_errors
from mllmrec.launch import trainer_placement
from mllmrec.llm.runner import ShardDone
from mllmrec.loggers import build_loggers, finish_loggers
from mllmrec.metrics import EvalSpec, short_label
from mllmrec.pipeline import build_model, prepare_inputs
from mllmrec.resume import completed_result, config_fingerprint, resume_checkpoint, write_fingerprint, write_metrics

log = logging.getLogger("mllmrec.train")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch 2.13
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # batches are prebuilt tensors


def _instantiate_group(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not launched by Hydra
        return Path.cwd()


def train(cfg: DictConfig) -> dict:
    out_dir = run_dir()
    EvalSpec.from_config(cfg.get("eval"))  # a metric that is not computed: one line, before any work
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
        if is_rank_zero():  # several processes: rank 0's loggers write (Lightning's own rule)
            finish_loggers(loggers, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _fit_and_test(cfg, inputs, datamodule, model, callbacks, loggers, out_dir: Path, fingerprint: str) -> dict:
    # every rank decides what to resume from before rank 0 writes this config's fingerprint (RunDirCheck,
    # once all ranks have started fit): a rank that started later must not read the new fingerprint
    resume_from = resume_checkpoint(cfg, out_dir, fingerprint)
    run_dir_check = RunDirCheck(out_dir, lambda: write_fingerprint(out_dir, cfg, fingerprint))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, run_dir_check], logger=loggers or False,
                                      **trainer_placement(cfg), **strategy_override(cfg.trainer, model))
    check_supported(trainer, model)  # several processes: one line before training when they cannot
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    fit_seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise SystemExit(130)

    # before testing: restoring the best checkpoint also restores the callbacks' state of that epoch
    stopped_early = any(getattr(c, "stopped_epoch", 0) > 0 for c in trainer.early_stopping_callbacks)
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
        "stopped_early": stopped_early,
        "dataset": cfg.dataset.name,
        "device": str(trainer.strategy.root_device),
        "artifacts": {name: str(a.path) for name, a in inputs.artifacts.items()},
    }
    if trainer.world_size > 1:
        metrics["processes"] = int(trainer.world_size)
        if not trainer.is_global_zero:  # rank 0 writes metrics.json and logs the run's line
            log.info("rank %d of %d done; rank 0 writes %s", trainer.global_rank, trainer.world_size,
                     out_dir / "metrics.json")
            return metrics
    write_metrics(out_dir, metrics)
    spec = model.eval_spec
    tested = " ".join(f"{short_label(m)} {metrics[m]:.4f}" for m in spec.columns("test"))
    log.info("%s: best epoch %d of %d | val %s %.4f | test %s | fit %.1fs (%.3fs/epoch) | %s", cfg.dataset.name,
             metrics["best_epoch"], epochs, short_label(spec.select), metrics[spec.select], tested, fit_seconds,
             metrics["seconds_per_epoch"], out_dir / "metrics.json")
    return metrics


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="train")
@report_errors
def main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
        return float(metrics[EvalSpec.from_config(cfg.get("eval")).select])
    except ShardDone as done:  # llm.shard: this job generated its share; training waits for the merge
        log.info("%s", done)
        if is_rank_zero():
            write_metrics(run_dir(), {"status": "shard_done", "message": str(done)})
        return float("nan")
    except Exception as exc:
        message = one_line(exc)
        if is_rank_zero():  # several processes: rank 0's metrics.json only
            write_metrics(run_dir(), {"status": "failed", "error": f"{type(exc).__name__}: {message}"})
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # keep the sweep going: the summary marks this job failed, the others' results stand
            log.error("job failed: %s", message, exc_info=not isinstance(exc, MLLMRecError))
            return float("nan")
        raise


if __name__ == "__main__":
    main()
