"""The dataset's split (``dataset.split``): MMRec's as in the file (``mmrec``, the default), or a
cold-start item split (``cold_items``).

``cold_items`` (``dataset.cold_ratio``, ``dataset.cold_seed``), the rule:

1. ``round(cold_ratio * n_items)`` items, drawn uniformly with ``numpy.random.default_rng(cold_seed)``
   (a permutation of the item ids, first ones taken), become *cold*: every interaction with them
   leaves training. The first half of the drawn items (rounded up) are the validation cold items, the
   other half the test cold items: all interactions with a validation cold item form the validation
   split, all interactions with a test cold item the test split (an item-level split: the items that
   select the epoch are not the items tested);
2. warm items keep MMRec's per-user rule as the file gives it (``x_label``): their training
   interactions stay training interactions; their validation and test interactions are left out (this
   split measures cold items only; the warm protocol is ``dataset.split=mmrec``);
3. evaluation ranks a split's cold items only (:meth:`mllmrec.data.RecData.non_candidates`): warm items
   are no candidates (the strict item cold-start protocol), so a model cannot score by popularity;
4. users left without a training interaction are left out of evaluation (they have no input to score
   from; counted in the log), as :meth:`mllmrec.datamodule.RecDataModule.eval_users` does for any split;
5. BPR negatives are drawn among the warm items only (cold items do not exist at training time).

The cold split is a property of the data, not of the run's seed: ``cold_seed`` is fixed by default (0),
so the seeds of a sweep train on the same split and pair up in the t-test.

Models: a model whose item is an ID embedding only (``needs == "ids"``: BPR, LightGCN) has nothing to
score a cold item with and refuses the split in one line before any work. The others score a cold item
from its features; where an ID embedding is part of the item representation (every multimodal
baseline), a cold item's ID part is its untrained initial value: they run, with that limitation
stated (:data:`ID_PART`, docs/models.md#cold-start).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import numpy as np
from omegaconf import DictConfig

from mllmrec.data import TEST, TRAIN, VALID, RecData
from mllmrec.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("mmrec", "cold_items")

# how each model's item representation treats a cold item (docs/models.md#cold-start)
ID_PART = {
    "mllmrec": "content only: the item tower over its features and the item-item graph (kNN edges only)",
    "vbpr": "[ID embedding, W x_i]: the ID half untrained",
    "lattice": "ID embedding + the learned feature kNN graph's propagation: its own ID part untrained",
    "freedom": "ID embedding + the frozen feature kNN graph's propagation: its own ID part untrained",
    "lgmrec": "ID embedding + feature hypergraph / kNN parts: its own ID part untrained",
    "smore": "ID embedding gated by its features, then the feature kNN graph: its own ID part untrained",
    "soil": "ID embedding x feature map, then the feature kNN graph: its own ID part untrained",
    "gume": "ID embedding x feature gate, then the feature kNN graph: its own ID part untrained",
    "slmrec": "[ID embedding, dense(features)]: the ID part untrained",
}


def split_name(dataset: DictConfig) -> str:
    name = str(dataset.get("split", "mmrec") or "mmrec")
    if name not in SPLITS:
        raise ConfigError("dataset.split", f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    return name


def check(dataset: DictConfig, model_cls=None, model_name: str = "") -> None:
    """One-line ConfigError for a bad split setting, or a model that cannot score cold items; before any work."""
    if split_name(dataset) != "cold_items":
        return
    ratio = dataset.get("cold_ratio", 0.2)
    try:
        ok = 0 < float(ratio) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError("dataset.cold_ratio", f"must be a share of the items in (0, 1), got {ratio!r}")
    seed = dataset.get("cold_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("dataset.cold_seed", f"must be an integer >= 0, got {seed!r}")
    if model_cls is not None and getattr(model_cls, "needs", "ids") == "ids":
        raise ConfigError("dataset.split", f"{model_name or model_cls.__name__} represents an item by an ID embedding "
                          "only, which a cold item never trains: it cannot score cold items (docs/models.md#cold-start)")


def apply(data: RecData, dataset: DictConfig) -> RecData:
    """``data`` under ``dataset.split``: unchanged for ``mmrec``, else :func:`cold_item_split`."""
    if split_name(dataset) == "mmrec":
        return data
    check(dataset)
    return cold_item_split(data, float(dataset.get("cold_ratio", 0.2)), int(dataset.get("cold_seed", 0)))


def cold_item_split(data: RecData, ratio: float, seed: int) -> RecData:
    """The cold-start item split of ``data`` (the module doc's rule); item and user ids unchanged."""
    n_cold = int(round(ratio * data.n_items))
    if n_cold < 2 or n_cold >= data.n_items:
        raise ConfigError("dataset.cold_ratio", f"{ratio} of {data.n_items} items gives {n_cold} cold items: "
                          "need at least 2 (one validation, one test) and at least one warm item")
    drawn = np.random.default_rng(seed).permutation(data.n_items)[:n_cold]
    n_valid = (n_cold + 1) // 2
    role = np.full(data.n_items, TRAIN, dtype=np.int8)  # TRAIN marks a warm item
    role[drawn[:n_valid]] = VALID
    role[drawn[n_valid:]] = TEST
    item_role = role[data.items]
    cold = item_role != TRAIN
    keep = cold | (data.split == TRAIN)  # warm items' valid/test interactions are left out
    split = np.where(cold, item_role, TRAIN).astype(np.int8)[keep]
    users, items = data.users[keep], data.items[keep]
    digest = hashlib.sha256(f"{data.fingerprint}|cold_items|{ratio!r}|{seed}".encode()).hexdigest()
    out = replace(data, users=users, items=items, split=split, fingerprint=digest,
                  sources={**data.sources, "split": f"cold_items(ratio={ratio}, seed={seed})"},
                  candidates={VALID: np.sort(drawn[:n_valid]), TEST: np.sort(drawn[n_valid:])})
    has_train = np.bincount(users[split == TRAIN], minlength=data.n_users) > 0
    counts = {code: np.bincount(users[split == code], minlength=data.n_users) > 0 for code in (VALID, TEST)}
    stranded = {code: int((c & ~has_train).sum()) for code, c in counts.items()}
    dropped = int(((data.split != TRAIN) & ~cold).sum())
    log.info("dataset.split=cold_items: %d cold items (%d validation, %d test; seed %d) with %d interactions out of "
             "training; %d warm validation/test interactions left out; training %d interactions; evaluated on %d "
             "validation / %d test users; users left without a training interaction, left out of evaluation: "
             "%d in validation, %d in test", n_cold, n_valid, n_cold - n_valid, seed, int(cold.sum()), dropped,
             int((split == TRAIN).sum()), int((counts[VALID] & has_train).sum()), int((counts[TEST] & has_train).sum()),
             stranded[VALID], stranded[TEST])
    return out
