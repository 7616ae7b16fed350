"""The multirun's comparison tables, one row per swept value: the paper's Table 2 (``variant``,
``ablation.md``) and Table 1 (``model``, ``models.md``); written by :class:`mllmrec.sweep.summary.SweepSummary`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from mllmrec.files import write_text_atomic
from mllmrec.metrics import EvalSpec, short_label
from mllmrec.sweep.cells import fmt_value, mean_std, setting_columns, varying

log = logging.getLogger("mllmrec.sweep.summary")


VARIANT_LABELS = {
    "full": "MLLMRec", "wo_rs": "w/o RS", "wo_gd": "w/o GD", "wo_te": "w/o TE",
    "wo_gcn_ii": "w/o GCN_II", "w_gcn_ui": "w/ GCN_UI",
}


def _cell_status(cell: pd.Series) -> str:
    if not cell["failed"]:
        return "completed"
    return "failed" if not cell["n"] else f"{cell['failed']} of {cell['n'] + cell['failed']} failed"


def _table_value(cell: pd.Series, metric: str, with_n: bool):
    """A number as today with one seed per cell; ``mean ± std (n)`` once seeds are swept."""
    if not cell["n"]:
        return None
    if not with_n:
        return round(float(cell[f"{metric}_mean"]), 4)
    return f"{mean_std(cell, metric)} ({cell['n']})"


MODEL_LABELS = {
    "mllmrec": "MLLMRec", "bpr": "BPR", "lightgcn": "LightGCN", "vbpr": "VBPR",
    "lattice": "LATTICE", "freedom": "FREEDOM", "lgmrec": "LGMRec",
}


def _at(k: int) -> tuple:
    return ((f"R@{k}", f"test/recall@{k}"), (f"N@{k}", f"test/ndcg@{k}"))


def tables(spec: EvalSpec) -> tuple:
    """(swept key, file stem, row labels, columns) of the paper's Table 2 (test R/N at the largest
    cut-off) and Table 1 (test R/N at every cut-off), each with the selecting validation metric."""
    selected_by = ((f"val {short_label(spec.select)}", spec.select),)
    return (
        ("variant", "ablation", VARIANT_LABELS, (*_at(max(spec.topk)), *selected_by)),
        ("model", "models", MODEL_LABELS, (*(c for k in spec.topk for c in _at(k)), *selected_by)),
    )


def comparison_table(cells: pd.DataFrame, sweep_dir: Path, key: str, stem: str, labels: dict, metrics: tuple) -> Path:
    """One row per cell, named by its ``key`` value (the paper's Table 1 for ``model``, Table 2 for
    ``variant``): the test ``metrics`` (label, metric), among them the validation metric used to select, best
    epoch and seconds per epoch; ``mean ± std (n)`` over the seeds when seeds were swept. Writes
    ``<stem>.md`` and ``<stem>.csv``."""
    with_n = bool((cells["n"] > 1).any())
    others = [c for c in setting_columns(cells) if c != key and varying(cells, c)]
    rows, numbers = [], []
    for _, c in cells.iterrows():
        head = {key: labels.get(str(c[key]), str(c[key])), **{k: fmt_value(c[k]) for k in others}}
        rows.append({**head, **{label: _table_value(c, m, with_n) for label, m in metrics},
                     "best epoch": (round(float(c["best_epoch_mean"]), 1) if with_n else c["best_epoch_mean"]) if c["n"] else None,
                     "s/epoch": round(float(c["seconds_per_epoch_mean"]), 2) if c["n"] else None,
                     "status": _cell_status(c)})
        numbers.append({**head, **{f"{label}{suffix}": c[f"{m}{suffix}"] for label, m in metrics for suffix in ("_mean", "_std")},
                        "best epoch": c["best_epoch_mean"], "s/epoch": c["seconds_per_epoch_mean"],
                        "n": c["n"], "status": _cell_status(c)})
    write_text_atomic(sweep_dir / f"{stem}.csv", pd.DataFrame(numbers).to_csv(index=False))
    table = pd.DataFrame(rows)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in r) + " |")
    path = write_text_atomic(sweep_dir / f"{stem}.md", "\n".join(lines) + "\n")
    note = " (mean ± std (n) over seeds)" if with_n else ""
    log.info("%s (test metrics at the best validation epoch%s):\n%s", stem, note, "\n".join(lines))
    return path
