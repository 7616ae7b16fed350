"""The paper's Figure 3: vanilla vs refined item-item graph for each graph-based baseline.

Called by the multirun summary (:class:`mllmrec.sweep.summary.SweepSummary`) when ``graph.refine`` varies
(``python -m mllmrec.train experiment=plug_in -m``): writes ``plug_in.csv`` (test R@20 / N@20 per
model and setting, the mean over seeds when several ran, and the relative gain) and
``plug_in.png``, a grouped bar chart of test R@20 with the gain printed above each pair. "R@20"
is Recall at the largest cut-off of ``eval.topk``; the validation column is ``eval.valid_metric``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mllmrec.files import write_text_atomic
from mllmrec.metrics import EvalSpec, short_label
from mllmrec.sweep.cells import summarize_cells

log = logging.getLogger("mllmrec.plug_in")


def charted(spec: EvalSpec) -> str:
    """The metric charted and compared: test Recall at the largest cut-off."""
    return f"test/recall@{max(spec.topk)}"


def _metrics(spec: EvalSpec) -> tuple[str, ...]:
    return charted(spec), f"test/ndcg@{max(spec.topk)}", spec.select


def _is_refined(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def plug_in_table(df: pd.DataFrame, spec: EvalSpec | None = None) -> pd.DataFrame:
    """One row per model: vanilla and refined means over the completed jobs (any other swept
    setting, e.g. the seed, pooled: :func:`mllmrec.sweep.cells.summarize_cells` on model x refined), and
    the R@20 gain; the std (ddof=1) of test R@20 over the pooled runs beside each mean."""
    spec = spec or EvalSpec.default()
    metrics, main = _metrics(spec), charted(spec)
    ok = df[df["status"] == "completed"]
    if not len(ok):
        return pd.DataFrame()
    jobs = pd.DataFrame({"model": ok["model"].astype(str) if "model" in ok else "model",
                         "refined": ok["graph.refine"].map(_is_refined), "status": ok["status"],
                         **{m: ok[m] for m in metrics}})
    cells = summarize_cells(jobs, spec)
    rows = []
    for model, g in cells.groupby("model", sort=True):
        row = {"model": model}
        for refined, label in ((False, "vanilla"), (True, "refined")):
            part = g[g["refined"] == refined]
            row[f"{label} runs"] = int(part["n"].sum())
            for m in metrics:
                row[f"{label} {m}"] = float(part[f"{m}_mean"].iloc[0]) if len(part) else float("nan")
            row[f"{label} {main} std"] = float(part[f"{main}_std"].iloc[0]) if len(part) else float("nan")
        row[f"{short_label(main)} gain %"] = 100.0 * (row[f"refined {main}"] / row[f"vanilla {main}"] - 1.0)
        rows.append(row)
    return pd.DataFrame(rows)


def plot_plug_in(table: pd.DataFrame, path: Path, title: str = "", spec: EvalSpec | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not len(table):
        return None
    main = charted(spec or EvalSpec.default())
    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(table), 3.6))
    van, ref = table[f"vanilla {main}"], table[f"refined {main}"]
    # ± std over the seeds where several ran (a single run has no std: no bar)
    van_sd, ref_sd = (table.get(f"{s} {main} std", pd.Series(np.nan, index=table.index)).fillna(0.0)
                      for s in ("vanilla", "refined"))
    bars = {"capsize": 4, "error_kw": {"elinewidth": 1}}
    ax.bar(x - 0.2, van, 0.4, yerr=van_sd, label="vanilla", color="#9aa5b1", **bars)
    ax.bar(x + 0.2, ref, 0.4, yerr=ref_sd, label="+ refinement (α, Jaccard)", color="#d9534f", **bars)
    for xi, v, r, g in zip(x, van + van_sd, ref + ref_sd, table[f"{short_label(main)} gain %"]):
        if pd.notna(g):
            ax.annotate(f"{g:+.1f}%", (xi, max(v, r)), ha="center", va="bottom", fontsize=9,
                        xytext=(0, 3), textcoords="offset points")
    runs = int(max(table["vanilla runs"].max(), table["refined runs"].max()))
    if runs > 1:
        ax.set_xlabel(f"mean ± std over up to {runs} runs (seeds) per bar")
    ax.set_xticks(x, [m.upper() for m in table["model"]])
    ax.set_ylabel(f"test Recall@{main.rpartition('@')[2]}")
    ax.set_ylim(0, float(np.nanmax([(van + van_sd).max(), (ref + ref_sd).max()])) * 1.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "plug-and-play graph refinement")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize_plug_in(df: pd.DataFrame, sweep_dir: Path, dataset: str = "", spec: EvalSpec | None = None) -> Path | None:
    """plug_in.csv + plug_in.png in the sweep folder; returns the chart's path."""
    spec = spec or EvalSpec.default()
    main = charted(spec)
    label = short_label(main)
    table = plug_in_table(df, spec)
    write_text_atomic(sweep_dir / "plug_in.csv", table.to_csv(index=False))
    log.info("plug-in refinement (test %s, vanilla -> refined): %s", label, " | ".join(
        f"{r['model']} {r[f'vanilla {main}']:.4f} -> {r[f'refined {main}']:.4f} ({r[f'{label} gain %']:+.1f}%)"
        for _, r in table.iterrows()))
    return plot_plug_in(table, sweep_dir / "plug_in.png", f"{dataset}: plug-and-play refinement (Figure 3)", spec)
