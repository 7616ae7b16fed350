"""Where a multirun job trains: one GPU per job on a box with several (Hydra launchers).

Hydra's launchers (``hydra/launcher=parallel`` = joblib, ``submitit_local``, ``slurm`` =
submitit_slurm; presets in ``conf/hydra/launcher``) start the grid's jobs; this module only
decides, inside a job, which local GPU it uses:

- ``launcher.gpus_per_node: 0`` (default): the trainer's own choice (``trainer.devices``). On
  SLURM this is right: the scheduler hands each job its GPUs through ``CUDA_VISIBLE_DEVICES``.
  On one GPU, concurrent jobs (``hydra.launcher.n_jobs``) all share it.
- ``launcher.gpus_per_node: N`` (N > 0): job number n trains on local GPU ``n % N``, so N
  concurrent jobs on an N-GPU machine take one GPU each (and 2N jobs, two per GPU).

The choice is made from the job number, not from the worker process, so it holds when a
launcher reuses one worker process for several jobs (joblib's loky backend does).
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from mllmrec.errors import ConfigError

log = logging.getLogger(__name__)


def gpu_for_job(job_num: int | None, gpus_per_node: int) -> int | None:
    """Local GPU index for job ``job_num``, or None to leave the choice to the trainer."""
    if gpus_per_node < 0:
        raise ConfigError("launcher.gpus_per_node", f"must be >= 0, got {gpus_per_node}")
    if gpus_per_node == 0 or job_num is None:
        return None
    return int(job_num) % gpus_per_node


def current_job_num() -> int | None:
    """Hydra's job number in a multirun (None outside Hydra or in a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None


def trainer_placement(cfg: DictConfig) -> dict:
    """Extra ``pl.Trainer`` arguments that put this job on its GPU ({} when nothing to do)."""
    gpus = int(cfg.get("launcher", {}).get("gpus_per_node", 0) or 0)
    index = gpu_for_job(current_job_num(), gpus)
    if index is None:
        return {}
    if not torch.cuda.is_available():
        log.warning("launcher.gpus_per_node=%d but no CUDA device is visible: training on %s", gpus,
                    cfg.trainer.get("accelerator", "auto"))
        return {}
    visible = torch.cuda.device_count()
    if index >= visible:
        raise ConfigError("launcher.gpus_per_node", f"is {gpus} but this machine shows {visible} CUDA device(s)")
    torch.cuda.set_device(index)  # plain "cuda" tensors of this job (stages, graph) land there too
    log.info("job %s trains on cuda:%d (launcher.gpus_per_node=%d)", current_job_num(), index, gpus)
    return {"accelerator": "gpu", "devices": [index]}
