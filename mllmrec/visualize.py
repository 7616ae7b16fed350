"""``python -m mllmrec.visualize run_dir=... [n_users=500]``: t-SNE of sampled users' final
representations h_u from a trained run's best checkpoint (the paper's Figure 6) -> ``<run_dir>/tsne_users.png``."""

from __future__ import annotations

import logging

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.errors import report_errors

log = logging.getLogger("mllmrec.visualize")


def tsne_users(h_users: np.ndarray, n_users: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(h_users), size=min(n_users, len(h_users)), replace=False))
    perplexity = float(min(30, max(2, (len(sample) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(h_users[sample])
    return sample, xy


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="visualize")
@report_errors
def main(cfg: DictConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllmrec.runs import load_run

    run = load_run(cfg.run_dir)
    with torch.no_grad():
        h_u, _ = run.model.representations()
    h = h_u.detach().cpu().numpy()
    sample, xy = tsne_users(h, int(cfg.n_users), int(cfg.seed))
    activity = np.diff(run.inputs.data.train_matrix.indptr)[sample]
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.log2(np.maximum(activity, 1)), s=8, cmap="viridis", alpha=0.8)
    fig.colorbar(sc, ax=ax, label="log2 #training interactions")
    name = run.cfg.model._target_.rsplit(".", 1)[-1]
    ax.set_title(f"{run.cfg.dataset.name}: t-SNE of {len(sample)} users' representations ({name})")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    out = run.path / "tsne_users.png"
    fig.savefig(out, dpi=130)
    plt.close(fig)
    np.savez(run.path / "tsne_users.npz", users=sample, xy=xy)
    log.info("t-SNE of %d users -> %s", len(sample), out)
    print(out)


if __name__ == "__main__":
    main()
