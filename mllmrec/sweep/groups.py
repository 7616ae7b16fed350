"""Recall@K by item-popularity group (``eval.metrics`` with ``recall_groups``), one bar group per model:
``popularity_groups.png`` of a multirun that sweeps ``model`` (``experiment=baselines``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mllmrec.metrics import EvalSpec
from mllmrec.metrics.spec import GROUPS
from mllmrec.sweep.tables import MODEL_LABELS


def plot_popularity_groups(cells: pd.DataFrame, path: Path, title: str | None = None,
                           spec: EvalSpec | None = None) -> Path | None:
    """Bars of mean test Recall@K (K the largest cut-off) of the head, mid and tail popularity groups per
    model, ± std over seeds where seeds were swept; None when the groups were not computed."""
    spec = spec or EvalSpec.default()
    k = max(spec.topk)
    columns = [f"test/recall@{k}_{g}_mean" for g in GROUPS]
    if "model" not in cells or any(c not in cells for c in columns):
        return None
    ok = cells[(cells["n"] > 0) & cells[columns].notna().all(axis=1)]
    if not len(ok):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_max = int(ok["n"].max())
    labels = [MODEL_LABELS.get(str(m), str(m)) for m in ok["model"]]
    x = np.arange(len(ok))
    width = 0.8 / len(GROUPS)
    lo, hi = spec.group_cuts
    names = {"head": f"head (top {lo:.0%} of items)", "mid": f"mid ({lo:.0%}-{hi:.0%})",
             "tail": f"tail (bottom {1 - hi:.0%})"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(ok) + 2), 3.8))
    for j, g in enumerate(GROUPS):
        mean = ok[f"test/recall@{k}_{g}_mean"].astype(float)
        std = ok[f"test/recall@{k}_{g}_std"].astype(float).fillna(0) if n_max > 1 else None
        ax.bar(x + (j - 1) * width, mean, width, yerr=std, capsize=2, label=names[g])
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"test Recall@{k}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="items by training popularity", title_fontsize=8)
    seeds = f", mean ± std over {n_max} seeds" if n_max > 1 else ""
    ax.set_title(f"{title + ': ' if title else ''}Recall@{k} by popularity group{seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
