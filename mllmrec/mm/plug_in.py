"""The paper's Figure 3: vanilla vs refined item-item graph for each graph-based baseline.

Called by the multirun summary (:class:`mllmrec.sweep.SweepSummary`) when ``graph.refine`` varies
(``python -m mllmrec.train experiment=plug_in -m``): writes ``plug_in.csv`` (test R@20 / N@20 per
model and setting, the mean over seeds when several ran, and the relative gain) and
``plug_in.png``, a grouped bar chart of test R@20 with the gain printed above each pair.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mllmrec.cells import summarize_cells
from mllmrec.files import write_text_atomic

log = logging.getLogger("mllmrec.plug_in")

METRICS = ("test/recall@20", "test/ndcg@20", "val/recall@20")


def _is_refined(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def plug_in_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model: vanilla and refined means over the completed jobs (any other swept
    setting, e.g. the seed, pooled: :func:`mllmrec.cells.summarize_cells` on model x refined), and
    the R@20 gain."""
    ok = df[df["status"] == "completed"]
    if not len(ok):
        return pd.DataFrame()
    jobs = pd.DataFrame({"model": ok["model"].astype(str) if "model" in ok else "model",
                         "refined": ok["graph.refine"].map(_is_refined), "status": ok["status"],
                         **{m: ok[m] for m in METRICS}})
    cells = summarize_cells(jobs)
    rows = []
    for model, g in cells.groupby("model", sort=True):
        row = {"model": model}
        for refined, label in ((False, "vanilla"), (True, "refined")):
            part = g[g["refined"] == refined]
            row[f"{label} runs"] = int(part["n"].sum())
            for m in METRICS:
                row[f"{label} {m}"] = float(part[f"{m}_mean"].iloc[0]) if len(part) else float("nan")
        row["R@20 gain %"] = 100.0 * (row["refined test/recall@20"] / row["vanilla test/recall@20"] - 1.0)
        rows.append(row)
    return pd.DataFrame(rows)


def plot_plug_in(table: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not len(table):
        return None
    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(table), 3.6))
    van, ref = table["vanilla test/recall@20"], table["refined test/recall@20"]
    ax.bar(x - 0.2, van, 0.4, label="vanilla", color="#9aa5b1")
    ax.bar(x + 0.2, ref, 0.4, label="+ refinement (α, Jaccard)", color="#d9534f")
    for xi, v, r, g in zip(x, van, ref, table["R@20 gain %"]):
        if pd.notna(g):
            ax.annotate(f"{g:+.1f}%", (xi, max(v, r)), ha="center", va="bottom", fontsize=9,
                        xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, [m.upper() for m in table["model"]])
    ax.set_ylabel("test Recall@20")
    ax.set_ylim(0, float(np.nanmax([van.max(), ref.max()])) * 1.18)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "plug-and-play graph refinement")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize_plug_in(df: pd.DataFrame, sweep_dir: Path, dataset: str = "") -> Path | None:
    """plug_in.csv + plug_in.png in the sweep folder; returns the chart's path."""
    table = plug_in_table(df)
    write_text_atomic(sweep_dir / "plug_in.csv", table.to_csv(index=False))
    log.info("plug-in refinement (test R@20, vanilla -> refined): %s", " | ".join(
        f"{r['model']} {r['vanilla test/recall@20']:.4f} -> {r['refined test/recall@20']:.4f} ({r['R@20 gain %']:+.1f}%)"
        for _, r in table.iterrows()))
    return plot_plug_in(table, sweep_dir / "plug_in.png", f"{dataset}: plug-and-play refinement (Figure 3)")
