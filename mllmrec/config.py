"""Config helpers: resolvers and range checks run before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mllmrec.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EMBEDDED_DATASETS = Path(__file__).resolve().parent / "datasets"

# characters a job dir name keeps as they are: the name then works unquoted as a Hydra override value
# and in a shell (``run_dir=<sweep dir>/<job dir>``); the rest is mapped or dropped
_DIRNAME_MAP = str.maketrans({"/": ".", "\\": ".", ",": "+", ":": "-", "=": "-", **{c: None for c in "[]{}()'\" \t"}})
_DIRNAME_KEEP = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+@%")


def safe_dirname(text: str, limit: int = 200) -> str:
    """A job's overrides as ONE folder name that can be passed back as it is: no path separator, no
    ``=`` or ``,`` (Hydra's override grammar) and nothing a shell would expand; of bounded length.
    The overrides arrive as Hydra's ``override_dirname`` with ``kv_sep: "-"`` and ``item_sep: "__"``
    (``conf/hydra/default.yaml``): ``model-freedom__seed-1``; a list value ``[5,20]`` becomes ``5+20``."""
    text = "".join(c for c in str(text).translate(_DIRNAME_MAP) if c in _DIRNAME_KEEP)
    if len(text) > limit:  # cut at an override boundary: a name never ends half-way through a value
        cut = text[:limit].rfind("__")
        text = text[:cut] if cut > 0 else text[:limit]
    return text or "defaults"


def seed_axis(seeds) -> str:
    """``seeds: 5`` -> the sweep axis ``range(1,6)`` (seeds 1..5), for ``hydra.sweeper.params.seed``."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError("seeds", f"must be an integer >= 1 (the number of seeds per grid cell), got {seeds!r}")
    return f"range(1,{seeds + 1})"


def run_stamp(now: str) -> str:
    """The last part of a single run's dir (``hydra.run.dir``): ``now``, its start time; but inside an
    ``srun`` step of several tasks (one training job on several processes), ``slurm-<job id>.<step id>``,
    the same for every task, whose own start times differ (docs/distributed.md)."""
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") and tasks.isdigit() and int(tasks) > 1:
        return f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    return now


if not OmegaConf.has_resolver("mllmrec_run_stamp"):
    OmegaConf.register_new_resolver("mllmrec_run_stamp", run_stamp)
if not OmegaConf.has_resolver("mllmrec_seed_axis"):
    OmegaConf.register_new_resolver("mllmrec_seed_axis", seed_axis)
if not OmegaConf.has_resolver("mllmrec_datasets"):
    OmegaConf.register_new_resolver("mllmrec_datasets", lambda: str(EMBEDDED_DATASETS))
if not OmegaConf.has_resolver("mllmrec_safe"):
    OmegaConf.register_new_resolver("mllmrec_safe", safe_dirname)


def _check(cfg: DictConfig, key: str, ok, message: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(key, f"{message}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Refuse out-of-range settings up front, naming the key."""
    _check(cfg, "graph.alpha", lambda v: -1.0 <= float(v) <= 1.0, "must be in [-1, 1]")
    for key in ("graph.k_s", "graph.k_c"):
        _check(cfg, key, lambda v: int(v) == v and v >= 1, "must be an integer >= 1")
    _check(cfg, "graph.layers", lambda v: int(v) == v and v >= 0, "must be an integer >= 0")
    for key in ("model.d", "model.d1", "data.batch_size"):
        _check(cfg, key, lambda v: int(v) == v and v >= 1, "must be an integer >= 1")
    _check(cfg, "data.eval_batch_size", lambda v: v == "auto" or (int(v) == v and v >= 1), "must be 'auto' or an integer >= 1")
    _check(cfg, "model.optimizer.lr", lambda v: float(v) > 0, "must be > 0")
    _check(cfg, "reason.history", lambda v: v in ("train", "all"), "must be 'train' or 'all'")
    _check(cfg, "model.user_init", lambda v: v in ("preference", "random"), "must be 'preference' or 'random'")
    # issue 13: the static-shape (CUDA graphs) step and the per-job GPU of a multirun
    _check(cfg, "model.cuda_graphs", lambda v: str(v).lower() in ("auto", "true", "false"), "must be auto, true or false")
    _check(cfg, "launcher.gpus_per_node", lambda v: int(v) == v and v >= 0, "must be an integer >= 0")
