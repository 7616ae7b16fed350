"""One training job on several processes (DDP): the ranks' shares, the checks before training, rank 0's writes.

``trainer.devices=N trainer.strategy=ddp`` starts N processes on one machine (Lightning relaunches
``python -m mllmrec.train`` with the same overrides and run dir: gloo on CPU, NCCL on GPUs); under
SLURM, ``srun`` starts the N tasks itself and Lightning's ``SLURMEnvironment`` ranks them
(docs/distributed.md). Every rank builds the same inputs (stage cache) and the same initial model;
then, per epoch:

- training: the same global permutation of the training triplets from (seed, epoch) on every rank;
  rank r trains on its contiguous share, ``floor(n / N)`` triplets (:func:`triplet_share`; the
  ``n mod N`` < N last ones of that epoch's permutation are left out, a different few each epoch),
  in batches of ``data.batch_size``; DDP averages the gradients, so a step is the BPR mean over
  ``N x data.batch_size`` triplets and an epoch has N times fewer steps;
- evaluation: the evaluated users split in N nearly equal contiguous parts (:func:`user_share`);
  each rank sums its users' metrics, the sums and counts are all-reduced, and every rank logs the
  same exact means (so early stopping and checkpointing decide alike on every rank);
- rank 0 alone writes checkpoints (Lightning), ``.config_fingerprint`` and ``metrics.json``.

A model or strategy that cannot run this way is refused in one line before training
(:func:`check_supported`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mllmrec.errors import ConfigError

log = logging.getLogger(__name__)

# Lightning's registered name of DDP with ``find_unused_parameters=True``
DDP_FIND_UNUSED = "ddp_find_unused_parameters_true"


def rank_and_world(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(global rank, number of processes) of a trainer; (0, 1) without one."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (also before the Trainer exists: Lightning reads RANK,
    LOCAL_RANK or SLURM_PROCID from the environment)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


def triplet_share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of an epoch's ``n`` permuted triplets: the contiguous ``floor(n / world)``
    rows from ``rank * floor(n / world)``. Equal shares give every rank the same number of steps
    (DDP needs that) and batches of equal sizes (so DDP's gradient average is the mean over all
    rows); the last ``n mod world`` rows are left out of the epoch. One process: all ``n`` rows."""
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def user_share(users: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s part of the evaluated users: ``world`` contiguous parts whose sizes differ by
    at most one, together all the users (one process: all of them)."""
    if world > 1 and len(users) < world:
        raise ConfigError("trainer.devices", f"{len(users)} evaluated users cannot be split over {world} "
                          "processes (each rank needs at least one)")
    return np.array_split(users, world)[rank]


def all_reduce_sum(values: torch.Tensor, trainer: pl.Trainer | None) -> torch.Tensor:
    """``values`` summed over the ranks (one collective); unchanged with one process."""
    _, world = rank_and_world(trainer)
    if world == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return values
    out = values.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def strategy_override(trainer_cfg, model) -> dict:
    """Extra Trainer arguments for ``trainer.strategy=ddp``: Lightning's DDP with
    ``broadcast_buffers=False`` (a model's buffers are its fixed inputs, the same on every rank: features,
    graphs; DDP would otherwise send rank 0's to every rank before every step) and, for a model that
    leaves some parameters without gradient in some steps (``ddp_find_unused_parameters``),
    ``find_unused_parameters=True``. Other strategies are Lightning's as given."""
    if str(trainer_cfg.get("strategy", "auto")) != "ddp":
        return {}
    from pytorch_lightning.strategies import DDPStrategy

    unused = bool(getattr(model, "ddp_find_unused_parameters", False))
    return {"strategy": DDPStrategy(find_unused_parameters=unused, broadcast_buffers=False)}


def check_supported(trainer: pl.Trainer, model) -> None:
    """One line (ConfigError) when this trainer would run ``model`` on several processes in a way
    mllmrec does not support; nothing with one process."""
    rank, world = rank_and_world(trainer)
    if world == 1:
        return
    name = type(model).__name__
    from pytorch_lightning.strategies import DDPStrategy
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        raise ConfigError("trainer.strategy", f"{type(strategy).__name__} on {world} processes is not supported: "
                          "use trainer.strategy=ddp")
    launcher = strategy.launcher
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise ConfigError("trainer.strategy", f"{type(launcher).__name__} (ddp_spawn / ddp_fork / notebook) keeps "
                          "the run's state in its workers: use trainer.strategy=ddp")
    reason = model.distributed_refusal(trainer)
    if reason:
        raise ConfigError("trainer.strategy", f"{name} cannot train on {world} processes: {reason}")
    if getattr(model, "ddp_find_unused_parameters", False) and not getattr(strategy, "_ddp_kwargs", {}).get(
            "find_unused_parameters"):
        raise ConfigError("trainer.strategy", f"{name} leaves some parameters without gradient in some steps: "
                          f"give trainer.strategy=ddp (mllmrec turns on find_unused_parameters) or {DDP_FIND_UNUSED}")


class RunDirCheck(pl.Callback):
    """At the start of fit, after every rank has decided what to resume from: with several
    processes, every rank must use the same run dir (else one line, on every rank); then rank 0
    writes the run dir's config fingerprint (``on_fit``)."""

    def __init__(self, run_dir: Path, on_fit):
        self.run_dir = Path(run_dir).resolve()
        self.on_fit = on_fit

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        rank, world = rank_and_world(trainer)
        if world > 1:
            dirs: list = [None] * world
            torch.distributed.all_gather_object(dirs, str(self.run_dir))
            if len(set(dirs)) > 1:
                raise ConfigError("hydra.run.dir", f"the {world} processes have different run dirs "
                                  f"({', '.join(sorted(set(dirs)))}): give every task the same hydra.run.dir")
            log.info("rank %d of %d: run dir %s", rank, world, self.run_dir)
        if trainer.is_global_zero:
            self.on_fit()
