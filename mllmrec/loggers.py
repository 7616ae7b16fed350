"""Experiment loggers (``logger`` config group): CSV, W&B; secrets never leave the environment."""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.I)


def scrub(obj):
    """Drop values whose key looks like a secret (the name of an env var holding one is kept)."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if SECRET.search(str(k)) and not str(k).endswith("_env") else scrub(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def _hydra():
    try:
        return HydraConfig.get()
    except ValueError:
        return None


def wandb_group(cfg: DictConfig, sweep_dir: Path | None = None) -> str:
    """group = sweep name + dataset (multirun), or dataset + 'runs' (single runs)."""
    hc = _hydra()
    dataset = OmegaConf.select(cfg, "dataset.name") or "data"
    if sweep_dir is not None:
        return f"{Path(sweep_dir).name}-{dataset}"
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return f"{Path(hc.sweep.dir).name}-{dataset}"
    return f"{dataset}-runs"


def run_name(cfg: DictConfig) -> str:
    hc = _hydra()
    overrides = hc.job.override_dirname if hc is not None else ""
    return f"{OmegaConf.select(cfg, 'dataset.name')}:{overrides or 'defaults'}"


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, lg in (cfg.get("logger") or {}).items():
        if not isinstance(lg, DictConfig) or "_target_" not in lg:
            continue
        extra = {}
        if lg._target_.endswith("WandbLogger"):
            extra["group"] = lg.get("group") or wandb_group(cfg)
            extra["name"] = lg.get("name") or run_name(cfg)
            extra["config"] = scrub(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(instantiate(lg, _partial_=True)(**extra))
    return loggers


def finish_loggers(loggers: list, summary: dict | None = None) -> None:
    """Write final metrics into each W&B run's summary and close the run (one run per job)."""
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            if summary:
                lg.experiment.summary.update(summary)
            wandb.finish()
