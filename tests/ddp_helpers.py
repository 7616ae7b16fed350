"""Helpers for the several-process tests (importable by every rank: the tests put tests/ on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl


class RecordTriplets(pl.Callback):
    """Writes every (epoch, user, positive, negative) row this rank trained on to
    ``<out>/rank<r>-from<first epoch>.npy`` at the end of fit."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.rows: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        users, pos, neg = (t.detach().cpu().numpy() for t in batch)
        epoch = np.full(len(users), trainer.current_epoch, dtype=np.int64)
        self.rows.append(np.stack([epoch, users, pos, neg], axis=1))

    def on_train_end(self, trainer, pl_module) -> None:
        rows = np.concatenate(self.rows) if self.rows else np.zeros((0, 4), np.int64)
        first = int(rows[0, 0]) if len(rows) else -1
        self.out.mkdir(parents=True, exist_ok=True)
        np.save(self.out / f"rank{trainer.global_rank}-from{first}.npy", rows)
