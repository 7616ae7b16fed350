"""``python -m mllmrec.recommend run_dir=... topk=20 [user=...]``: top-K recommendations from a
trained run's best checkpoint, training items excluded, written to ``<run_dir>/recommendations.parquet``
(userID, rank, itemID, score, title when metadata exists)."""

from __future__ import annotations

import logging

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.errors import ConfigError, report_errors
from mllmrec.files import atomic_file

log = logging.getLogger("mllmrec.recommend")


@torch.no_grad()
def recommend(model, train_matrix, users: np.ndarray, topk: int, batch_size: int = 4096) -> pd.DataFrame:
    """Top-``topk`` unseen items per user (training items masked out), best first."""
    frames = []
    with model.scoring():  # one representation pass for all blocks of users
        for start in range(0, len(users), batch_size):
            batch = users[start : start + batch_size]
            val, idx = model.top_k(batch, topk, train_matrix)
            k = idx.shape[1]
            frames.append(pd.DataFrame({
                "userID": np.repeat(batch, k),
                "rank": np.tile(np.arange(1, k + 1), len(batch)),
                "itemID": idx.cpu().numpy().ravel(),
                "score": val.cpu().numpy().ravel(),
            }))
    out = pd.concat(frames, ignore_index=True)
    return out[np.isfinite(out["score"])].reset_index(drop=True)  # users who saw (nearly) everything


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="recommend")
@report_errors
def main(cfg: DictConfig) -> None:
    from mllmrec.runs import load_run

    run = load_run(cfg.run_dir)
    data = run.inputs.data
    if cfg.user is not None and not (0 <= int(cfg.user) < data.n_users):
        raise ConfigError("user", f"must be a userID in [0, {data.n_users - 1}], got {cfg.user}")
    users = np.arange(data.n_users) if cfg.user is None else np.array([int(cfg.user)])
    recs = recommend(run.model, data.train_matrix, users, int(cfg.topk), int(cfg.batch_size))
    titles = data.item_field("title")
    if data.meta is not None:
        recs["title"] = [titles[i] for i in recs["itemID"]]
    out = run.path / "recommendations.parquet"
    with atomic_file(out) as tmp:
        recs.to_parquet(tmp, index=False)
    log.info("%d recommendations for %d users (top-%d, training items excluded) -> %s",
             len(recs), len(users), int(cfg.topk), out)

    shown = int(users[0]) if cfg.user is not None else int(np.argmax(np.diff(data.train_matrix.indptr) > 0))
    history = data.history("train")[shown]
    print(f"\nuser {shown}: {len(history)} training items" + (", latest:" if len(history) else ""))
    for i in history[-5:]:
        print(f"    - {titles[i] or f'item {i}'}")
    print(f"top-{int(cfg.topk)} recommendations:")
    for _, r in recs[recs["userID"] == shown].iterrows():
        print(f"  {int(r['rank']):>3}. item {int(r['itemID']):>6}  score {r['score']:.3f}  {titles[int(r['itemID'])]}")
    print(f"\nall users: {out}")


if __name__ == "__main__":
    main()
