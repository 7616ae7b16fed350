"""Reason stage (SPEC steps 3-4): one preference text per user -> ``users.parquet``.

Backends (``llm`` config group): ``none`` writes the user's behaviour list itself (item titles
of the TRAINING history joined with "; ") as the preference text.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from mllmrec.cache import ArtifactCache, Artifact
from mllmrec.data import RecData
from mllmrec.errors import ConfigError
from mllmrec.texts import title_lists

log = logging.getLogger(__name__)

STAGE = "reason"
OUTPUT = "users.parquet"


def run(cfg, data: RecData, cache: ArtifactCache) -> Artifact:
    backend = cfg.llm.backend
    history = cfg.reason.history
    if backend != "none":
        raise ConfigError("llm", f"backend {backend!r} is not available in this version (use llm=none)")
    config = {"backend": backend, "history": history, "separator": cfg.reason.separator}

    def build(out):
        texts = title_lists(data, history, cfg.reason.separator)
        lengths = np.array([len(t) for t in texts])
        pd.DataFrame(
            {"userID": np.arange(data.n_users), "text": texts, "finish_reason": "none"}
        ).to_parquet(out / OUTPUT, index=False)
        return {"users": data.n_users, "empty_texts": int((lengths == 0).sum()), "mean_chars": float(lengths.mean())}

    if history == "all":
        log.warning("reason.history=all: validation/test items leak into the user preference texts")
    return cache.fetch(STAGE, config, {"data": data.fingerprint}, build)


def load_texts(artifact: Artifact) -> list[str]:
    df = pd.read_parquet(artifact.file(OUTPUT))
    return df.sort_values("userID")["text"].fillna("").tolist()


if __name__ == "__main__":
    from mllmrec.pipeline import stage_cli

    stage_cli(STAGE)
