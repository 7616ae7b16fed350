"""Grid cells over seeds: group a multirun's jobs by every swept setting except the seed.

A *cell* is one combination of swept settings (e.g. alpha=0.6, K_c=10); its jobs differ only
in ``seed``. Per cell: mean, std (ddof=1) and count of each metric over the completed jobs.
The best cell has the highest MEAN of the selecting validation metric (``eval.valid_metric``,
default Recall@20). A cell is "not distinguishable from the
best" when the best's mean exceeds its mean by at most one standard error of the difference
of the two means, ``sqrt(s_b^2/n_b + s_c^2/n_c)`` (Welch's, seeds treated as independent
draws). Cells with fewer than two completed seeds (or a best cell with one) are not judged.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mllmrec.metrics import EvalSpec

RUN_COLUMNS = ("best_epoch", "epochs", "fit_seconds", "seconds_per_epoch")
NOT_SETTINGS = ("job", "overrides", "status", "error", "seed", *RUN_COLUMNS,
                "cell", "n", "failed", "seeds", "best", "se_diff", "within_1se_of_best")
# where a job wrote, what it logged to and how it showed progress: not what it trained (jobs of sweeps
# run apart into other folders, then joined, are one cell)
NOT_TRAINING = ("paths.", "hydra.", "logger", "trainer.enable_progress_bar")
RULE = "within 1 SE of the best: mean gap <= sqrt(s_best²/n_best + s²/n)"


def metric_columns(spec: EvalSpec) -> tuple[str, ...]:
    """The per-job numbers a summary keeps: every validation and test metric ``spec`` computes, then
    the run's epochs and seconds."""
    return (*spec.columns("val"), *spec.columns("test"), *RUN_COLUMNS)


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The swept settings that define a cell: every summary column but the seed, status and metrics."""
    return [c for c in df.columns if c not in NOT_SETTINGS and "=" not in c and not c.startswith(NOT_TRAINING)
            and not c.startswith(("val/", "test/")) and not c.endswith(("_mean", "_std"))]


def fmt_value(value) -> str:
    """A setting's value as it would be written on the command line (10 not 10.0)."""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:g}"
    return str(value)


def _stats(values: pd.Series) -> tuple[float, float]:
    vals = pd.to_numeric(values, errors="coerce").dropna()
    mean = float(vals.mean()) if len(vals) else math.nan
    std = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    return mean, std


def summarize_cells(df: pd.DataFrame, spec: EvalSpec | None = None) -> pd.DataFrame:
    """One row per cell: its settings, ``n`` completed jobs, ``failed``, seeds, ``<metric>_mean/_std``,
    and the verdict columns ``best`` and ``within_1se_of_best`` (see the module doc); ``spec``: the
    metrics and the selecting one (``conf/eval``)."""
    spec = spec or EvalSpec.default()
    select, settings = spec.select, setting_columns(df)
    rows = []
    groups = df.groupby(settings, dropna=False, sort=False) if settings else [((), df)]
    for _, group in groups:
        ok = group[group["status"] == "completed"]
        if select in ok:
            ok = ok[pd.to_numeric(ok[select], errors="coerce").notna()]
        row = {s: group[s].iloc[0] for s in settings}
        row["cell"] = ",".join(f"{s}={fmt_value(row[s])}" for s in settings) or "(defaults)"
        row["n"] = len(ok)
        row["failed"] = int((group["status"] != "completed").sum())
        if "seed" in group:
            row["seeds"] = " ".join(fmt_value(s) for s in ok["seed"])
        for m in metric_columns(spec):
            row[f"{m}_mean"], row[f"{m}_std"] = _stats(ok[m]) if m in ok else (math.nan, math.nan)
        rows.append(row)
    return judge(pd.DataFrame(rows), select)


def judge(cells: pd.DataFrame, select: str) -> pd.DataFrame:
    """Add ``best`` (highest mean of the ``select`` metric), ``se_diff`` and ``within_1se_of_best``."""
    cells = cells.copy()
    mean, std, n = cells[f"{select}_mean"].astype(float), cells[f"{select}_std"].astype(float), cells["n"]
    cells["best"] = False
    cells["se_diff"] = math.nan
    cells["within_1se_of_best"] = False
    if not mean.notna().any():
        return cells
    b = mean.idxmax()
    cells.loc[b, "best"] = True
    se = np.sqrt(std[b] ** 2 / n[b] + std**2 / n)  # NaN where a std is undefined (n < 2)
    cells["se_diff"] = se.where(~cells["best"])
    cells["within_1se_of_best"] = (~cells["best"]) & se.notna() & ((mean[b] - mean) <= se)
    return cells


def best_cell(cells: pd.DataFrame) -> pd.Series | None:
    hit = cells[cells["best"]] if "best" in cells else cells.iloc[:0]
    return hit.iloc[0] if len(hit) else None


def mean_std(cell: pd.Series, metric: str, digits: int = 4) -> str:
    """``0.0924 ± 0.0014`` (or ``0.0924`` where the std is undefined)."""
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    text = f"{mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def slice_at(cells: pd.DataFrame, anchor: pd.Series | None, keep: tuple[str, ...]) -> pd.DataFrame:
    """The cells that agree with ``anchor`` on every setting outside ``keep`` (a 2-D slice of a larger grid)."""
    if anchor is None:
        return cells
    mask = pd.Series(True, index=cells.index)
    for col in setting_columns(cells):
        if col not in keep and col in anchor and cells[col].astype(str).nunique() > 1:
            mask &= cells[col].astype(str) == str(anchor[col])
    return cells[mask]


def varying(df: pd.DataFrame, key: str) -> bool:
    return key in df and df[key].astype(str).nunique() > 1
