"""Reopen a finished training run: its config, inputs (from the cache) and best checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mllmrec import config as mconfig  # also registers the config resolvers
from mllmrec.errors import ConfigError
from mllmrec.models.base import Inputs
from mllmrec.pipeline import build_model, prepare_inputs

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
    run_dir = Path(run_dir).expanduser().resolve()
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError("run_dir", f"{cfg_path} not found (expected a run dir written by mllmrec.train)")
    cfg = upgrade_config(OmegaConf.load(cfg_path))
    ckpt = find_checkpoint(run_dir)
    inputs = prepare_inputs(cfg)
    model = build_model(cfg, inputs)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    log.info("loaded %s (epoch %s)", ckpt, state.get("epoch"))
    return Run(run_dir, cfg, inputs, model, ckpt)


# ``_target_`` paths of run dirs written before the model zoo (mllmrec/models/) -> today's
MOVED_TARGETS = {
    "mllmrec.model.MLLMRecModule": "mllmrec.models.mllmrec.MLLMRecModule",
    "mllmrec.baselines.BPRModule": "mllmrec.models.bpr.BPRModule",
    "mllmrec.baselines.LightGCNModule": "mllmrec.models.lightgcn.LightGCNModule",
    "mllmrec.mm.vbpr.VBPRModule": "mllmrec.models.vbpr.VBPRModule",
    "mllmrec.mm.lattice.LATTICEModule": "mllmrec.models.lattice.LATTICEModule",
    "mllmrec.mm.freedom.FREEDOMModule": "mllmrec.models.freedom.FREEDOMModule",
    "mllmrec.mm.lgmrec.LGMRecModule": "mllmrec.models.lgmrec.LGMRecModule",
}


def model_preset(path: Path) -> dict:
    """A ``conf/model`` preset composed as Hydra does (unresolved): its defaults list's
    ``/<group>@<key>: <name>`` entries (the optimizer) under ``<key>``, then its own keys over them."""
    node = OmegaConf.load(path)
    composed = OmegaConf.create()
    for entry in node.pop("defaults", []):
        if isinstance(entry, str):  # _self_
            continue
        ((target, name),) = entry.items()
        group, _, key = str(target).lstrip("/").partition("@")
        composed = OmegaConf.merge(composed, {key or group: OmegaConf.load(mconfig.CONF_DIR / group / f"{name}.yaml")})
    return OmegaConf.to_container(OmegaConf.merge(composed, node), resolve=False)


def _today_model_node(target: str) -> dict:
    """The ``conf/model`` preset of today whose ``_target_`` is ``target`` (unresolved), or {}."""
    for path in sorted((mconfig.CONF_DIR / "model").glob("*.yaml")):
        node = model_preset(path)
        if node.get("_target_") == target:
            return node
    return {}


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """A run dir's config written by an older version, read as today's: a model ``_target_`` from before
    the model zoo takes its ``mllmrec.models`` path; a config written before the model took its
    optimizer from config gets ``model.lr`` / ``model.weight_decay`` moved into ``model.optimizer``
    (Adam, as those runs trained with), loses the old ``needs_features`` / ``needs_modalities`` flags
    (the class declares ``needs``), and takes today's preset values for keys added since (e.g. FREEDOM's
    ``refine: ${graph.refine}``, resolved against the run's own ``graph`` node). A current config is
    returned as it is."""
    node = OmegaConf.to_container(cfg.model, resolve=False)
    old_target = node.get("_target_")
    node["_target_"] = MOVED_TARGETS.get(old_target, old_target)
    if "optimizer" in node and node["_target_"] == old_target:
        return cfg
    if "optimizer" not in node:
        for flag in ("needs_features", "needs_modalities"):
            node.pop(flag, None)
        today = _today_model_node(node["_target_"])
        optimizer = dict(today.get("optimizer") or {"_target_": "torch.optim.Adam", "_partial_": True, "fused": True})
        optimizer.update({k: node.pop(k) for k in ("lr", "weight_decay") if k in node})
        node = {**{k: v for k, v in today.items() if k != "optimizer"}, **node, "optimizer": optimizer}
        log.info("%s: config written by an older version; model.lr/model.weight_decay read as model.optimizer.*",
                 node["_target_"])
    if node["_target_"] != old_target:
        log.info("config written by an older version: model._target_ %s read as %s", old_target, node["_target_"])
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model = OmegaConf.create(node)
    return cfg
