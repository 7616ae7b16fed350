"""LightningDataModule: BPR training triplets and full-ranking evaluation batches.

All tensors are built once in ``setup`` directly on the trainer's device (GPU when present), so
neither sampling nor evaluation copies the dataset from the host on every step.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch

from mllmrec.data import TRAIN, VALID, TEST, RecData
from mllmrec.distributed import rank_and_world, triplet_share, user_share
from mllmrec.metrics import make_eval_batch, sorted_contains

log = logging.getLogger(__name__)


def sample_negatives(
    users: torch.Tensor, train_keys: torch.Tensor, n_items: int, generator: torch.Generator, max_rounds: int = 1000,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """One uniform negative per row among the items ``users[row]`` has no training interaction with
    (and, with ``pool``, among the items of ``pool`` only: a cold-start split's warm items).

    ``train_keys`` is the sorted tensor of ``user * n_items + item`` over the training pairs.
    Collisions are redrawn, vectorised, until none is left.
    """
    def draw(shape):
        if pool is None:
            return torch.randint(n_items, shape, generator=generator, device=users.device)
        return pool[torch.randint(pool.numel(), shape, generator=generator, device=users.device)]

    neg = draw(users.shape)
    for _ in range(max_rounds):
        bad = sorted_contains(train_keys, users * n_items + neg).nonzero().squeeze(1)
        if bad.numel() == 0:
            return neg
        neg[bad] = draw((bad.numel(),))
    raise RuntimeError("negative sampling did not converge: some user interacted with (nearly) every item")


class TripletEpochs:
    """Iterable of (users, positives, negatives) batches; a fresh permutation and negatives per epoch.

    The epoch's randomness is seeded by (seed, epoch), so a resumed run draws the same batches.
    With several processes, each rank takes its share of the epoch's permutation
    (:func:`mllmrec.distributed.triplet_share`) and draws its negatives for those rows.
    """

    def __init__(self, dm: "RecDataModule"):
        self.dm = dm
        self._epoch = 0

    def __len__(self) -> int:
        if self.dm.epoch_as_one_batch:
            return 1
        share = triplet_share(self.dm.train_users.numel(), *rank_and_world(self.dm.trainer))
        n = share.stop - share.start
        return (n + self.dm.batch_size - 1) // self.dm.batch_size

    def __iter__(self):
        dm = self.dm
        epoch = dm.trainer.current_epoch if dm.trainer is not None else self._epoch
        self._epoch += 1
        device = dm.train_users.device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(dm.seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(dm.train_users.numel(), generator=gen, device=device)
        perm = perm[triplet_share(perm.numel(), *rank_and_world(dm.trainer))]  # several processes: this rank's
        users = dm.train_users[perm]
        pos = dm.train_items[perm]
        neg = sample_negatives(users, dm.train_keys, dm.n_items, gen, pool=dm.negative_pool)
        if dm.epoch_as_one_batch:  # the model splits it into batch_size steps itself (model.cuda_graphs)
            yield users, pos, neg
            return
        for start in range(0, users.numel(), dm.batch_size):
            end = start + dm.batch_size
            yield users[start:end], pos[start:end], neg[start:end]


class BatchList:
    """A fixed sequence of prebuilt batches, seen by Lightning as ONE dataloader."""

    def __init__(self, batches: list):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class RecDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 2048, eval_batch_size: int | str = "auto", seed: int = 999):
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = eval_batch_size
        self.seed = int(seed)
        self.data: RecData | None = None
        self._device: torch.device | None = None
        # set by a model that runs the epoch's steps itself (the static-shape step): one Lightning
        # batch per epoch, so Lightning's per-batch loop and hooks run once instead of per step
        self.epoch_as_one_batch = False
        self.negative_pool: torch.Tensor | None = None  # set in setup from the data (a cold-start split)

    def attach(self, data: RecData) -> "RecDataModule":
        self.data = data
        return self

    @property
    def n_items(self) -> int:
        return self.data.n_items

    def eval_users(self, code: int) -> np.ndarray:
        """Users evaluated on a split: with held-out items there and at least one training item."""
        heldout = np.bincount(self.data.users[self.data.split == code], minlength=self.data.n_users) > 0
        has_train = np.diff(self.data.train_matrix.indptr) > 0
        return np.flatnonzero(heldout & has_train)

    def setup(self, stage: str | None = None) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self._device == device:
            return
        if self.data is None:
            raise RuntimeError("RecDataModule.attach(data) must be called before training")
        d = self.data
        u, i = d.pairs(TRAIN)
        self.train_users = torch.as_tensor(u, dtype=torch.long, device=device)
        self.train_items = torch.as_tensor(i, dtype=torch.long, device=device)
        self.train_keys = torch.sort(self.train_users * d.n_items + self.train_items).values
        pool = d.negative_items()  # a cold-start split: warm items only
        self.negative_pool = None if pool is None else torch.as_tensor(pool, dtype=torch.long, device=device)
        # the items' training popularity, shared by every evaluation batch (beyond-accuracy metrics)
        item_pop = torch.as_tensor(np.bincount(i, minlength=d.n_items), dtype=torch.float64, device=device)
        train = d.train_matrix
        # CPU: small user blocks keep the [users x items] score block in cache (measured fastest);
        # GPU: large blocks keep the device busy
        size = self.eval_batch_size
        size = (256 if device.type == "cpu" else 8192) if size == "auto" else int(size)
        rank, world = rank_and_world(self.trainer)
        self.eval_batches = {}
        for name, code in (("valid", VALID), ("test", TEST)):
            heldout = d.split_matrix(code)
            everyone = self.eval_users(code)
            users = user_share(everyone, rank, world)  # several processes: this rank's users (metrics all-reduced)
            batches = []
            exclude = d.non_candidates(code)  # a cold-start split ranks its cold items only
            for start in range(0, len(users), size):
                b = make_eval_batch(users[start : start + size], train, heldout, exclude)
                batches.append({**{k: v.to(device) for k, v in b.items()}, "item_pop": item_pop})
            self.eval_batches[name] = batches
            if world == 1:
                log.info("%s: %d users evaluated in %d batch(es)", name, len(users), len(batches))
            else:
                log.info("%s: rank %d of %d evaluates %d of the %d users (ids %d..%d) in %d batch(es)", name,
                         rank, world, len(users), len(everyone), users[0] if len(users) else -1,
                         users[-1] if len(users) else -1, len(batches))
        if world > 1:
            n = self.train_users.numel()
            share = triplet_share(n, rank, world)
            per_rank = share.stop - share.start
            log.info("training: rank %d of %d trains on rows [%d, %d) of each epoch's permutation of the %d triplets "
                     "(%d each; %d left out per epoch), in batches of %d (a step averages %d x %d triplets)",
                     rank, world, share.start, share.stop, n, per_rank, n - world * per_rank, self.batch_size, world,
                     self.batch_size)
        self._device = device

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # batches are built on the trainer's device already: skip Lightning's generic traversal
        return batch

    def train_dataloader(self):
        return TripletEpochs(self)

    def val_dataloader(self):
        return BatchList(self.eval_batches["valid"])

    def test_dataloader(self):
        return BatchList(self.eval_batches["test"])
