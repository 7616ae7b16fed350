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

log = logging.getLogger("mllmrec.sweep")

AXES = ("graph.alpha", "graph.k_c")
METRIC_COLUMNS = (
    "val/recall@10", "val/recall@20", "val/ndcg@10", "val/ndcg@20",
    "test/recall@10", "test/recall@20", "test/ndcg@10", "test/ndcg@20",
    "best_epoch", "epochs", "fit_seconds",
)


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job folder under ``sweep_dir``: swept settings, status and metrics."""
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
            row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
        else:
            row["status"] = "failed"
            row["error"] = "no metrics.json (the job did not finish)"
        rows.append(row)
    df = pd.DataFrame(rows)
    # keep, besides the grid axes, only the override keys that differ between jobs (the swept ones)
    extra = [c for c in df.columns if "=" not in c and c not in ("job", "overrides", "status", "error", *AXES, *METRIC_COLUMNS)]
    df = df.drop(columns=[c for c in extra if df[c].astype(str).nunique() <= 1])
    if len(df) and "job" in df:
        df["_num"] = df["job"].str.extract(r"^(\d+)", expand=False).astype(float)
        df = df.sort_values("_num").drop(columns="_num").reset_index(drop=True)
    return df


def best_row(df: pd.DataFrame) -> pd.Series | None:
    ok = df[(df["status"] == "completed") & df["val/recall@20"].notna()] if "val/recall@20" in df else df.iloc[:0]
    if not len(ok):
        return None
    return ok.loc[ok["val/recall@20"].astype(float).idxmax()]


def plot_heatmap(df: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    """Validation R@20 over alpha x K_c beside test R@20; the best-validation cell is boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = df[df["status"] == "completed"]
    if not len(ok) or any(a not in ok for a in AXES):
        return None
    alphas = sorted(ok["graph.alpha"].astype(float).unique())
    kcs = sorted(ok["graph.k_c"].astype(int).unique())
    best = best_row(df)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(kcs) * 2, 1.5 + 0.8 * len(alphas)), squeeze=False)
    for ax, metric, label in zip(axes[0], ("val/recall@20", "test/recall@20"), ("validation R@20", "test R@20")):
        grid = np.full((len(alphas), len(kcs)), np.nan)
        for _, r in ok.iterrows():
            if r.get(metric) is not None and not (isinstance(r[metric], float) and math.isnan(r[metric])):
                grid[alphas.index(float(r["graph.alpha"])), kcs.index(int(r["graph.k_c"]))] = float(r[metric])
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(kcs)), [str(k) for k in kcs])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("K_c (co-occurrence neighbours)")
        ax.set_ylabel("alpha (similarity threshold)")
        ax.set_title(label)
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for a in range(len(alphas)):
            for k in range(len(kcs)):
                if np.isfinite(grid[a, k]):
                    ax.text(k, a, f"{grid[a, k]:.4f}", ha="center", va="center", fontsize=8,
                            color="black" if grid[a, k] > mid else "white")
        if best is not None:
            a, k = alphas.index(float(best["graph.alpha"])), kcs.index(int(best["graph.k_c"]))
            ax.add_patch(plt.Rectangle((k - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title or "alpha x K_c sensitivity (red box: best validation R@20)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


VARIANT_LABELS = {
    "full": "MLLMRec", "wo_rs": "w/o RS", "wo_gd": "w/o GD", "wo_te": "w/o TE",
    "wo_gcn_ii": "w/o GCN_II", "w_gcn_ui": "w/ GCN_UI",
}


def varying(df: pd.DataFrame, key: str) -> bool:
    return key in df and df[key].astype(str).nunique() > 1


def ablation_table(df: pd.DataFrame, sweep_dir: Path) -> Path:
    """Table-2-like summary: test R@20 / N@20 per variant (and validation R@20 used to select)."""
    rows = []
    for _, r in df.iterrows():
        ok = r["status"] == "completed"
        rows.append({
            "variant": VARIANT_LABELS.get(str(r["variant"]), str(r["variant"])),
            "R@20": round(float(r["test/recall@20"]), 4) if ok else None,
            "N@20": round(float(r["test/ndcg@20"]), 4) if ok else None,
            "val R@20": round(float(r["val/recall@20"]), 4) if ok else None,
            "best epoch": r.get("best_epoch") if ok else None,
            "status": r["status"],
        })
    table = pd.DataFrame(rows)
    table.to_csv(sweep_dir / "ablation.csv", index=False)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in r) + " |")
    path = sweep_dir / "ablation.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("ablation (test metrics at the best validation epoch):\n%s", "\n".join(lines))
    return path


def plot_line(df: pd.DataFrame, key: str, path: Path, title: str = "") -> Path | None:
    """Metric against one swept numeric setting (e.g. model.d: the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "completed"].copy()
    ok["_x"] = pd.to_numeric(ok[key], errors="coerce")
    ok = ok.dropna(subset=["_x"]).sort_values("_x")
    if not len(ok):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("recall@20", "ndcg@20")):
        for split, style in (("val", "o--"), ("test", "s-")):
            ax.plot(ok["_x"], ok[f"{split}/{metric}"].astype(float), style, label=split)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ok["_x"], [f"{x:g}" for x in ok["_x"]])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"sensitivity to {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log_to_wandb(config: DictConfig, sweep_dir: Path, df: pd.DataFrame, heatmap: Path | None) -> None:
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
        table = df.astype({c: "string" for c in df.columns if df[c].dtype == object}).fillna("")
        run.log({"summary": wandb.Table(dataframe=table)})
        if heatmap is not None:
            run.log({"heatmap": wandb.Image(str(heatmap))})
        best = best_row(df)
        if best is not None:
            keep = [*AXES, *METRIC_COLUMNS, "overrides"]
            run.summary.update({f"best/{k}": best[k] for k in keep if k in best and best[k] is not None})
    finally:
        run.finish()


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        df = collect(sweep_dir)
        if not len(df):
            log.warning("multirun: no job folders under %s", sweep_dir)
            return
        csv_path = sweep_dir / "summary.csv"
        df.to_csv(csv_path, index=False)
        dataset = OmegaConf.select(config, "dataset.name")
        heatmap = None
        if any(varying(df, a) for a in AXES):
            heatmap = plot_heatmap(df, sweep_dir / "heatmap.png", f"{dataset}: alpha x K_c (red box: best validation R@20)")
        if varying(df, "variant"):
            ablation_table(df, sweep_dir)
        if varying(df, "graph.refine"):  # experiment=plug_in: the paper's Figure 3
            from mllmrec.mm.plug_in import summarize_plug_in

            heatmap = summarize_plug_in(df, sweep_dir, dataset) or heatmap
        if varying(df, "seed"):
            ok = df[df["status"] == "completed"]
            spread = {m: (ok[m].astype(float).mean(), ok[m].astype(float).std(ddof=1)) for m in METRIC_COLUMNS[:8]}
            log.info("over %d seeds (mean ± std): %s", len(ok),
                     " | ".join(f"{m} {mu:.4f} ± {sd:.4f}" for m, (mu, sd) in spread.items() if m.startswith("test/")))
        skip = (*AXES, "variant", "seed", "graph.refine", "model", "job", "overrides", "status", "error", *METRIC_COLUMNS)
        others = [c for c in df.columns if c not in skip and varying(df, c)]
        for key in others:
            if pd.to_numeric(df[key], errors="coerce").notna().all():
                plot = plot_line(df, key, sweep_dir / "sweep.png", f"{dataset}: sensitivity to {key}")
                heatmap = heatmap or plot
                break
        n_failed = int((df["status"] != "completed").sum())
        log.info("multirun: %d jobs (%d failed) -> %s%s", len(df), n_failed, csv_path,
                 f", {heatmap}" if heatmap else "")
        best = best_row(df)
        if best is not None:
            log.info(
                "best by validation R@20: %s | val R@20 %.4f | test R@10 %.4f R@20 %.4f N@10 %.4f N@20 %.4f",
                best["overrides"] or "(defaults)", best["val/recall@20"], best["test/recall@10"],
                best["test/recall@20"], best["test/ndcg@10"], best["test/ndcg@20"],
            )
        try:
            _log_to_wandb(config, sweep_dir, df, heatmap)
        except Exception as exc:  # the summary files stand even if W&B is unreachable
            log.error("multirun: could not log the summary to W&B: %s", exc)
        if n_failed:
            for _, r in df[df["status"] != "completed"].iterrows():
                log.error("job %s failed: %s", r["job"], r["error"])
            print(f"error: {n_failed} of {len(df)} jobs failed; see {csv_path}", file=sys.stderr)
            sys.exit(1)
