"""Reopen a finished training run: its config, inputs (from the cache) and best checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mllmrec import config as _config  # noqa: F401  (registers the config resolvers)
from mllmrec.errors import ConfigError
from mllmrec.pipeline import Inputs

log = logging.getLogger(__name__)


@dataclass
class Run:
    path: Path
    cfg: DictConfig
    inputs: Inputs
    model: torch.nn.Module
    checkpoint: Path


def find_checkpoint(run_dir: Path) -> Path:
    for cand in (run_dir / "checkpoints" / "best.ckpt", run_dir / "checkpoints" / "last.ckpt"):
        if cand.is_file():
            return cand
    raise ConfigError("run_dir", f"no checkpoint under {run_dir / 'checkpoints'} (is it a finished training run?)")


def load_run(run_dir: str | Path) -> Run:
    from mllmrec.train import build_model, prepare_inputs

    run_dir = Path(run_dir).expanduser().resolve()
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError("run_dir", f"{cfg_path} not found (expected a run dir written by mllmrec.train)")
    cfg = OmegaConf.load(cfg_path)
    ckpt = find_checkpoint(run_dir)
    inputs = prepare_inputs(cfg)
    model = build_model(cfg, inputs)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    log.info("loaded %s (epoch %s)", ckpt, state.get("epoch"))
    return Run(run_dir, cfg, inputs, model, ckpt)
