"""Training learns: on data with planted structure, a trained MLLMRec beats an untrained one by a
margin that an untrained model, or one trained with the BPR sign flipped, cannot reach.

Planted structure: 4 clusters of 12 items and 16 users; every user interacts with 6 items of its
own cluster (4 train, 1 valid, 1 test); user and item input features are the cluster's direction
plus noise. After masking its 4 training items, a user's 8 other cluster items (its valid item
among them) fit into the top 10 of 44, so a model that learned the clusters reaches validation
Recall@10 close to 1; ranking blind to the clusters gets about 10/44 = .23 in expectation, and
a model pushed the wrong way ranks the cluster's items last (Recall@10 close to 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from mllmrec.models import mllmrec as model_mod
from mllmrec.data import RecData
from mllmrec.datamodule import RecDataModule
from mllmrec.models.base import Inputs, adam
from mllmrec.models.mllmrec import MLLMRecModule

N_CLUSTERS, ITEMS_PER, USERS_PER, PER_USER, DIM = 4, 12, 16, 6, 16


def planted(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_users, n_items = N_CLUSTERS * USERS_PER, N_CLUSTERS * ITEMS_PER
    users, items, split = [], [], []
    for u in range(n_users):
        c = u // USERS_PER
        chosen = rng.choice(ITEMS_PER, PER_USER, replace=False) + c * ITEMS_PER
        users += [u] * PER_USER
        items += chosen.tolist()
        split += [0] * (PER_USER - 2) + [1, 2]
    data = RecData("planted", n_users, n_items, np.array(users, np.int64), np.array(items, np.int64),
                   np.array(split, np.int8))
    centers = rng.standard_normal((N_CLUSTERS, DIM))
    user_x = centers[np.arange(n_users) // USERS_PER] + 0.5 * rng.standard_normal((n_users, DIM))
    item_x = centers[np.arange(n_items) // ITEMS_PER] + 0.5 * rng.standard_normal((n_items, DIM))
    return data, torch.tensor(user_x, dtype=torch.float32), torch.tensor(item_x, dtype=torch.float32)


def val_recall10(epochs: int, seed: int = 0) -> float:
    data, user_x, item_x = planted()
    pl.seed_everything(seed, verbose=False)
    model = MLLMRecModule(Inputs(data, user_x, item_x), adam(lr=1e-2), d=8, d1=32)
    dm = RecDataModule(batch_size=32, seed=seed).attach(data)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    if epochs:
        trainer.fit(model, datamodule=dm)
    return trainer.validate(model, datamodule=dm, verbose=False)[0]["val/recall@10"]


@pytest.mark.parametrize("seed", [0, 1])
def test_training_learns_the_planted_clusters(monkeypatch, seed):
    untrained = val_recall10(0, seed)
    trained = val_recall10(15, seed)
    # the same training with the sign of the BPR difference flipped
    right = model_mod.bpr_logsigmoid
    monkeypatch.setattr(model_mod, "bpr_logsigmoid", lambda u, p, n: right(u, n, p))
    flipped = val_recall10(15, seed)

    assert trained >= 0.9, (untrained, trained, flipped)
    assert trained >= untrained + 0.4, (untrained, trained, flipped)
    assert flipped <= 0.1, (untrained, trained, flipped)  # the test discriminates a sign error
