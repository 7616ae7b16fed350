"""Shared cases for the multimodal-baseline tests: a hand-made 5x7 case, and a planted-structure
dataset (users and items in C clusters, each user interacting with items of its own cluster only;
item features = cluster centre + noise)."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch

from mllmrec.data import RecData


def planted_data(n_clusters=4, users_per=12, items_per=15, per_user=8, dim=16, seed=0, signal=1.0,
                 modalities=("text",)):
    """``signal=0``: features carry no cluster information (the model must learn from the IDs).
    ``modalities=("text", "image")`` adds an image modality: other cluster centres (12-d) + noise,
    drawn after the text features (the text features are the same either way)."""
    rng = np.random.default_rng(seed)
    users, items, split = [], [], []
    for c in range(n_clusters):
        for u in range(users_per):
            uid = c * users_per + u
            chosen = rng.choice(items_per, per_user, replace=False) + c * items_per
            users += [uid] * per_user
            items += chosen.tolist()
            split += [0] * (per_user - 2) + [1, 2]
    n_users, n_items = n_clusters * users_per, n_clusters * items_per
    data = RecData("planted", n_users, n_items, np.array(users), np.array(items), np.array(split, np.int8))
    centres = rng.standard_normal((n_clusters, dim))
    feats = signal * np.repeat(centres, items_per, axis=0) + 0.3 * rng.standard_normal((n_items, dim))
    mods = {"text": feats.astype(np.float32)}
    if "image" in modalities:
        image_centres = rng.standard_normal((n_clusters, 12))
        image = signal * np.repeat(image_centres, items_per, axis=0) + 0.3 * rng.standard_normal((n_items, 12))
        mods["image"] = image.astype(np.float32)
    return data, {m: mods[m] for m in modalities}


def val_recall_before_after(model, data, epochs=15, batch_size=64) -> tuple[float, float]:
    """Validation Recall@10 of the untrained model, then after ``epochs`` of training."""
    from mllmrec.datamodule import RecDataModule

    def trainer(max_epochs):
        return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)

    dm = RecDataModule(batch_size=batch_size, seed=1).attach(data)
    before = trainer(1).validate(model, datamodule=dm, verbose=False)[0]["val/recall@10"]
    trainer(epochs).fit(model, datamodule=dm)
    after = trainer(1).validate(model, datamodule=dm, verbose=False)[0]["val/recall@10"]
    return before, after


def hand_case(seed: int):
    """A hand-made case: 5 users x 7 items, 6-d features (seeded), and one batch of (u, pos, neg)."""
    rng = np.random.default_rng(seed)
    train = np.zeros((5, 7), np.float32)
    for u, items in enumerate([[0, 1, 2], [1, 3], [2, 4, 5], [0, 5, 6], [3, 6]]):
        train[u, items] = 1
    feats = rng.standard_normal((7, 6)).astype(np.float32)
    batch = (torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 3, 4, 6, 3, 2]), torch.tensor([4, 0, 1, 2, 5, 6]))
    return sp.csr_matrix(train), feats, batch
