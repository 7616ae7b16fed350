"""The multirun's comparison tables, one row per swept value: the paper's Table 2 (``variant``,
``ablation.md``) and Table 1 (``model``, ``models.md``; on a cold-start split, ``dataset.split=cold_items``,
the cold-start table ``cold_start.md``); written by :class:`mllmrec.sweep.summary.SweepSummary`."""

from __future__ import annotations

import logging
import math
import re
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
    "lattice": "LATTICE", "freedom": "FREEDOM", "lgmrec": "LGMRec", "smore": "SMORE", "soil": "SOIL",
    "gume": "GUME", "slmrec": "SLMRec",
}


def _at(k: int) -> tuple:
    return ((f"R@{k}", f"test/recall@{k}"), (f"N@{k}", f"test/ndcg@{k}"))


def _computed(spec: EvalSpec, names: tuple[str, ...]) -> tuple:
    """(label, test column) of each of the metric ``names`` that ``spec`` computes."""
    return tuple((short_label(n), f"test/{n}") for n in names if n in spec.names)


def tables(spec: EvalSpec, split: str = "mmrec") -> tuple:
    """(swept key, file stem, row labels, columns, reference row) of the paper's Table 2 (test R/N at
    the largest cut-off) and Table 1 (test R/N at every cut-off; item coverage and the tail group's
    recall at the largest one where ``eval.metrics`` computes them; a paired t-test of every model
    against MLLMRec), each with the selecting validation metric. On a cold-start split (``split``
    ``cold_items``) the model table is the cold-start table ``cold_start`` (R/N at every cut-off,
    precision, MAP and hit rate at the largest where computed)."""
    selected_by = ((f"val {short_label(spec.select)}", spec.select),)
    k = max(spec.topk)
    accuracy = tuple(c for kk in spec.topk for c in _at(kk))
    if split == "cold_items":
        model_table = ("model", "cold_start", MODEL_LABELS,
                       (*accuracy, *_computed(spec, (f"precision@{k}", f"map@{k}", f"hit@{k}")), *selected_by), "mllmrec")
    else:
        beyond = _computed(spec, (f"coverage@{k}", f"recall@{k}_head", f"recall@{k}_tail"))
        model_table = ("model", "models", MODEL_LABELS, (*accuracy, *beyond, *selected_by), "mllmrec")
    return (
        ("variant", "ablation", VARIANT_LABELS, (*_at(k), *selected_by), None),
        model_table,
    )


def paired_p_values(jobs: pd.DataFrame, key: str, reference: str, metric: str) -> dict[str, float]:
    """Two-sided paired t-test (``scipy.stats.ttest_rel``) of every ``key`` value against ``reference`` on
    ``metric``, the completed jobs paired by seed (and by every other swept setting): the paper's
    "p < 0.05" claim. NaN where fewer than two seeds pair up; {} without a seed axis or the reference."""
    from scipy.stats import ttest_rel

    if metric not in jobs or "seed" not in jobs:
        return {}
    ok = jobs[(jobs["status"] == "completed") & pd.to_numeric(jobs[metric], errors="coerce").notna()]
    if reference not in set(ok[key].astype(str)):
        return {}
    pair_on = [c for c in setting_columns(jobs) if c != key and varying(jobs, c)] + ["seed"]
    values = ok.assign(**{c: ok[c].astype(str) for c in pair_on}, _v=pd.to_numeric(ok[metric]))
    ref = values[values[key].astype(str) == reference].set_index(pair_on)["_v"].rename("ref")
    out = {}
    for value, group in values.groupby(values[key].astype(str)):
        if value == reference:
            continue
        pairs = group.set_index(pair_on)["_v"].to_frame().join(ref, how="inner")
        out[value] = float(ttest_rel(pairs["_v"], pairs["ref"]).pvalue) if len(pairs) >= 2 else math.nan
    return out


def comparison_table(cells: pd.DataFrame, sweep_dir: Path, key: str, stem: str, labels: dict, metrics: tuple,
                     reference: str | None = None, jobs: pd.DataFrame | None = None) -> Path:
    """One row per cell, named by its ``key`` value (the paper's Table 1 for ``model``, Table 2 for
    ``variant``): the test ``metrics`` (label, metric), among them the validation metric used to select, best
    epoch and seconds per epoch; ``mean ± std (n)`` over the seeds when seeds were swept; with a
    ``reference`` row and the per-seed ``jobs``, the paired t-test p-value against it on the first
    ``metrics`` column of the largest cut-off (:func:`paired_p_values`). Writes ``<stem>.md`` and ``<stem>.csv``."""
    with_n = bool((cells["n"] > 1).any())
    others = [c for c in setting_columns(cells) if c != key and varying(cells, c)]
    tested = [m for _, m in metrics if re.fullmatch(r"test/recall@\d+", m)][-1:]  # Recall at the largest cut-off
    p_values = paired_p_values(jobs, key, reference, tested[0]) if reference and jobs is not None and tested else {}
    p_label = f"p vs {labels.get(reference, reference)} ({short_label(tested[0])})" if p_values else None
    rows, numbers = [], []
    for _, c in cells.iterrows():
        head = {key: labels.get(str(c[key]), str(c[key])), **{k: fmt_value(c[k]) for k in others}}
        p_cell = {p_label: p_values.get(str(c[key]), math.nan)} if p_label else {}
        rows.append({**head, **{label: _table_value(c, m, with_n) for label, m in metrics},
                     **{k: (f"{v:.2g}" if not math.isnan(v) else None) for k, v in p_cell.items()},
                     "best epoch": (round(float(c["best_epoch_mean"]), 1) if with_n else c["best_epoch_mean"]) if c["n"] else None,
                     "s/epoch": round(float(c["seconds_per_epoch_mean"]), 2) if c["n"] else None,
                     "status": _cell_status(c)})
        numbers.append({**head, **{f"{label}{suffix}": c[f"{m}{suffix}"] for label, m in metrics for suffix in ("_mean", "_std")},
                        **p_cell, "best epoch": c["best_epoch_mean"], "s/epoch": c["seconds_per_epoch_mean"],
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
