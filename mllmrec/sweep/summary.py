"""End-of-multirun summary: ``summary.csv``, ``heatmap.png`` (the paper's Figure 4), best config.

Registered as a Hydra callback (``conf/hydra/default.yaml``). Each job writes ``metrics.json``
into its own folder with ``status`` ``completed`` or ``failed``; this callback gathers them,
so one failed job is marked in the summary while the others' results stand.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mllmrec.files import write_text_atomic
from mllmrec.metrics import EvalSpec, short_label
from mllmrec.sweep.cells import (
    RULE,
    best_cell,
    mean_std,
    metric_columns,
    setting_columns,
    slice_at,
    summarize_cells,
    varying,
)
from mllmrec.sweep.groups import plot_popularity_groups
from mllmrec.sweep.tables import comparison_table, tables

log = logging.getLogger("mllmrec.sweep.summary")

AXES = ("graph.alpha", "graph.k_c")
BEST_STYLE = {"edgecolor": "red", "linewidth": 2.5}
TIED_STYLE = {"edgecolor": "magenta", "linewidth": 2.5, "linestyle": "--"}


def collect(sweep_dir: Path, spec: EvalSpec | None = None) -> pd.DataFrame:
    """One row per job folder under ``sweep_dir``: swept settings, status and the metrics of ``spec``."""
    columns = metric_columns(spec or EvalSpec.default())
    rows = []
    for hydra_dir in sorted(sweep_dir.glob("*/.hydra")):
        job_dir = hydra_dir.parent
        overrides = OmegaConf.load(hydra_dir / "overrides.yaml")
        cfg = OmegaConf.load(hydra_dir / "config.yaml")
        row = {"job": job_dir.name, "overrides": ",".join(overrides)}
        for key in AXES:
            row[key] = OmegaConf.select(cfg, key)
        for ov in overrides:
            key, _, value = ov.partition("=")
            row.setdefault(key.lstrip("+~"), value)
        metrics_path = job_dir / "metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            row["status"] = metrics.get("status", "completed")
            row["error"] = metrics.get("error", "")
            row.update({k: metrics.get(k) for k in columns})
        else:
            row["status"] = "failed"
            row["error"] = "no metrics.json (the job did not finish)"
        rows.append(row)
    df = pd.DataFrame(rows)
    # keep, besides the grid axes, only the override keys that differ between jobs (the swept ones)
    extra = [c for c in df.columns if "=" not in c and c not in ("job", "overrides", "status", "error", *AXES, *columns)]
    df = df.drop(columns=[c for c in extra if df[c].astype(str).nunique() <= 1])
    if len(df) and "job" in df:
        df["_num"] = df["job"].str.extract(r"^(\d+)", expand=False).astype(float)
        df = df.sort_values("_num").drop(columns="_num").reset_index(drop=True)
    return df


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """A summary table, written atomically: a reader (or a crash) never leaves half a CSV."""
    return write_text_atomic(path, df.to_csv(index=False))


def best_row(df: pd.DataFrame, select: str) -> pd.Series | None:
    """The best single JOB by the ``select`` metric (the best CELL, by mean, is ``cells.best_cell``)."""
    ok = df[(df["status"] == "completed") & df[select].notna()] if select in df else df.iloc[:0]
    if not len(ok):
        return None
    return ok.loc[ok[select].astype(float).idxmax()]


def _cell_grid(cells: pd.DataFrame, column: str, alphas: list, kcs: list):
    import numpy as np

    grid = np.full((len(alphas), len(kcs)), np.nan)
    for _, c in cells.iterrows():
        grid[alphas.index(float(c["graph.alpha"])), kcs.index(int(c["graph.k_c"]))] = c[column]
    return grid


def _cell_label(cell: pd.Series, metric: str, n_max: int) -> str:
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    text = f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f}\n± {std:.4f}"
    return text if cell["n"] == n_max else f"{text}\n(n={cell['n']})"


def _heatmap_panel(ax, cells: pd.DataFrame, metric: str, alphas: list, kcs: list):
    """One panel: the cells' mean ``metric`` with their labels and the best / within-1-SE outlines."""
    import matplotlib.pyplot as plt
    import numpy as np

    grid = _cell_grid(cells, f"{metric}_mean", alphas, kcs)
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(kcs)), [str(k) for k in kcs])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("K_c (co-occurrence neighbours)")
    ax.set_ylabel("alpha (similarity threshold)")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    n_max = int(cells["n"].max())
    for _, c in cells.iterrows():
        a, k = alphas.index(float(c["graph.alpha"])), kcs.index(int(c["graph.k_c"]))
        ax.text(k, a, _cell_label(c, metric, n_max), ha="center", va="center", fontsize=9,
                color="black" if grid[a, k] > mid else "white")
        if c["best"] or c["within_1se_of_best"]:
            ax.add_patch(plt.Rectangle((k - 0.46, a - 0.46), 0.92, 0.92, fill=False,
                                       **(BEST_STYLE if c["best"] else TIED_STYLE)))
    return im


def plot_heatmap(cells: pd.DataFrame, path: Path, title: str = "", spec: EvalSpec | None = None) -> Path | None:
    """Mean validation R@20 (the selecting metric of ``spec``) over alpha x K_c beside its mean on test,
    "± std" per cell when seeds were swept; the best cell (by the mean selecting metric) boxed, the
    cells within 1 SE of it outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    spec = spec or EvalSpec.default()
    select, test_metric = spec.select, f"test/{spec.valid_metric}"
    cells = slice_at(cells[cells[f"{select}_mean"].notna()], best_cell(cells), AXES)
    if not len(cells) or any(a not in cells for a in AXES):
        return None
    alphas = sorted(cells["graph.alpha"].astype(float).unique())
    kcs = sorted(cells["graph.k_c"].astype(int).unique())
    n_max = int(cells["n"].max())
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.5 * len(kcs) * 2, 2.3 + (1.0 if n_max > 1 else 0.8) * len(alphas)),
                             squeeze=False)
    for ax, metric, label in zip(axes[0], (select, test_metric),
                                 (f"validation {short_label(select)}", f"test {short_label(test_metric)}")):
        fig.colorbar(_heatmap_panel(ax, cells, metric, alphas, kcs), ax=ax, shrink=0.8)
        ax.set_title(label + (f", mean ± std over {n_max} seeds" if n_max > 1 else ""))
    handles = [Line2D([], [], color=BEST_STYLE["edgecolor"], linewidth=2.5,
                      label=f"best mean validation {short_label(select)}")]
    if n_max > 1:
        handles.append(Line2D([], [], color=TIED_STYLE["edgecolor"], linewidth=2.5, linestyle="--",
                              label=f"not distinguishable from the best ({RULE}, on validation {short_label(select)})"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title or "alpha x K_c sensitivity")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_line(cells: pd.DataFrame, key: str, path: Path, title: str = "", spec: EvalSpec | None = None) -> Path | None:
    """Metric against one swept numeric setting (e.g. model.d: the paper's Figure 5); the mean over
    seeds with ± std error bars when seeds were swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = slice_at(cells[cells["n"] > 0], best_cell(cells), (key,)).copy()
    ok["_x"] = pd.to_numeric(ok[key], errors="coerce")
    ok = ok.dropna(subset=["_x"]).sort_values("_x")
    if not len(ok):
        return None
    n_max = int(ok["n"].max())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    k = max((spec or EvalSpec.default()).topk)
    for ax, metric in zip(axes, (f"recall@{k}", f"ndcg@{k}")):
        for split, style in (("val", "o--"), ("test", "s-")):
            mean, std = ok[f"{split}/{metric}_mean"].astype(float), ok[f"{split}/{metric}_std"].astype(float)
            ax.errorbar(ok["_x"], mean, yerr=std.fillna(0) if n_max > 1 else None, fmt=style, capsize=3,
                        label=split + (f" (mean ± std, {n_max} seeds)" if n_max > 1 else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ok["_x"], [f"{x:g}" for x in ok["_x"]])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"sensitivity to {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _best_summary(cells: pd.DataFrame, spec: EvalSpec) -> dict:
    """The best cell's settings, n, and (mean, std) of each metric, as W&B summary keys."""
    best = best_cell(cells)
    if best is None:
        return {}
    out = {f"best/{k}": best[k] for k in setting_columns(cells) if not pd.isna(best[k])}
    out.update({"best/cell": best["cell"], "best/n": int(best["n"])})
    for m in metric_columns(spec):
        out[f"best/{m}/mean"] = best[f"{m}_mean"]
        if not math.isnan(best[f"{m}_std"]):
            out[f"best/{m}/std"] = best[f"{m}_std"]
    out["within_1se_of_best"] = list(cells.loc[cells["within_1se_of_best"], "cell"])
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}


def _wandb_table(df: pd.DataFrame):
    import wandb

    text = [c for c in df.columns if df[c].dtype == object]
    df = df.astype({c: "string" for c in text}).fillna({c: "" for c in text})
    return wandb.Table(dataframe=df.astype(object).where(df.notna(), None))  # a missing number: None, not ""


def _log_to_wandb(config: DictConfig, sweep_dir: Path, df: pd.DataFrame, cells: pd.DataFrame, plot: Path | None,
                  spec: EvalSpec) -> None:
    wb_cfg = OmegaConf.select(config, "logger.wandb")
    if wb_cfg is None:
        return
    import wandb

    from mllmrec.loggers import wandb_group

    run = wandb.init(
        project=wb_cfg.get("project"),
        entity=wb_cfg.get("entity"),
        group=wb_cfg.get("group") or wandb_group(config, sweep_dir),
        name="sweep-summary",
        job_type="sweep-summary",
        dir=str(sweep_dir),
        reinit=True,
    )
    try:
        run.log({"summary": _wandb_table(df), "summary_by_cell": _wandb_table(cells)})
        if plot is not None:
            run.log({plot.stem: wandb.Image(str(plot))})
        run.summary.update(_best_summary(cells, spec))
    finally:
        run.finish()


def _log_best(cells: pd.DataFrame, spec: EvalSpec) -> None:
    """The best cell by the mean selecting metric with (mean ± std, n), and the cells not distinguishable from it."""
    best = best_cell(cells)
    if best is None:
        return
    seeds = f" (mean ± std over {best['n']} seeds)" if best["n"] > 1 else ""
    label = f"val {short_label(spec.select)}"
    tested = " ".join(f"{short_label(m)} {mean_std(best, m)}" for m in spec.columns("test"))
    log.info("best by validation %s%s: %s | %s %s | test %s | n=%d", short_label(spec.select), seeds, best["cell"],
             label, mean_std(best, spec.select), tested, best["n"])
    if (cells["n"] > 1).any():
        tied = cells[cells["within_1se_of_best"]]
        listed = "; ".join(f"{c['cell']} ({label} {mean_std(c, spec.select)}, n={c['n']})" for _, c in tied.iterrows())
        log.info("not distinguishable from the best (%s): %s", RULE, listed or "none")


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        spec = EvalSpec.from_config(config.get("eval"))
        df = collect(sweep_dir, spec)
        if not len(df):
            log.warning("multirun: no job folders under %s", sweep_dir)
            return
        csv_path = sweep_dir / "summary.csv"
        write_csv(df, csv_path)
        cells = summarize_cells(df, spec)
        write_csv(cells, sweep_dir / "summary_by_cell.csv")
        dataset = OmegaConf.select(config, "dataset.name")
        plot = None
        if any(varying(df, a) for a in AXES):
            plot = plot_heatmap(cells, sweep_dir / "heatmap.png", f"{dataset}: alpha x K_c", spec)
        for key, stem, labels, metrics, reference in tables(spec, OmegaConf.select(config, "dataset.split") or "mmrec"):
            if varying(df, key):
                comparison_table(cells, sweep_dir, key, stem, labels, metrics, reference, df)
        if varying(df, "model"):  # Recall@K by popularity group, one bar group per model
            plot = plot_popularity_groups(cells, sweep_dir / "popularity_groups.png", dataset, spec) or plot
        if varying(df, "graph.refine"):  # experiment=plug_in: the paper's Figure 3
            from mllmrec.sweep.plug_in import summarize_plug_in

            plot = summarize_plug_in(df, sweep_dir, dataset, spec) or plot
        skip = (*AXES, "variant", "graph.refine", "model")
        others = [c for c in setting_columns(cells) if c not in skip and varying(cells, c)]
        for key in others:
            if pd.to_numeric(cells[key], errors="coerce").notna().all():
                line = plot_line(cells, key, sweep_dir / "sweep.png", f"{dataset}: sensitivity to {key}", spec)
                plot = plot or line
                break
        done = df["status"].isin(["completed", "shard_done"])  # shard_done: an LLM shard job saved its share
        n_failed = int((~done).sum())
        log.info("multirun: %d jobs in %d cells (%d failed) -> %s, %s%s", len(df), len(cells), n_failed, csv_path,
                 sweep_dir / "summary_by_cell.csv", f", {plot}" if plot else "")
        _log_best(cells, spec)
        try:
            _log_to_wandb(config, sweep_dir, df, cells, plot, spec)
        except Exception as exc:  # the summary files stand even if W&B is unreachable
            log.error("multirun: could not log the summary to W&B: %s", exc)
        if n_failed:
            for _, r in df[~done].iterrows():
                log.error("job %s failed: %s", r["job"], r["error"])
            print(f"error: {n_failed} of {len(df)} jobs failed; see {csv_path}", file=sys.stderr)
            sys.exit(1)
