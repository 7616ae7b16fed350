"""``prepare_report.json``: inputs, settings, counts at each step, time and package versions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mllmrec.cache import package_versions
from mllmrec.data import TEST, TRAIN, VALID
from mllmrec.prepare.ids import Interactions
from mllmrec.prepare.job import Job

REPORT = "prepare_report.json"


def _inputs(job: Job) -> dict:
    meta = job.meta
    return {
        "reviews": str(job.reviews.absolute()),
        "reviews_bytes": job.reviews.stat().st_size,
        "meta": str(meta.absolute()) if meta is not None else None,
        "meta_bytes": meta.stat().st_size if meta is not None else None,
    }


def build_report(
    job: Job, table: Interactions, labels: np.ndarray, review_stats: dict, n_dup: int, kcore: dict, meta_stats: dict
) -> dict:
    """The report of a preparation (without the time taken): ``review_stats`` from reading the
    reviews, ``kcore`` (``before_kcore``, ``kcore_passes``) and ``meta_stats`` from their steps."""
    n_users, n_items, n = len(table.user_names), len(table.item_names), len(labels)
    before = kcore["before_kcore"]
    return {
        "dataset": job.name,
        "output": str(job.dest),
        "inputs": _inputs(job),
        "settings": {"k": job.k, "split": job.split, "seed": int(job.seed), "strict": bool(job.strict)},
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "sparsity": round(1.0 - n / (n_users * n_items), 8),
        "split_counts": {s: int((labels == c).sum()) for s, c in (("train", TRAIN), ("valid", VALID), ("test", TEST))},
        **review_stats,
        "duplicates_collapsed": n_dup,
        "before_kcore": before,
        "dropped_by_kcore": {
            "users": before["users"] - n_users, "items": before["items"] - n_items,
            "interactions": before["interactions"] - n,
        },
        "kcore_passes": kcore["kcore_passes"],
        **meta_stats,
    }


def save_report(folder: Path, report: dict, start: float) -> None:
    """Add the seconds since ``start``, the date and the package versions to ``report``; write it
    into ``folder``."""
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["versions"] = package_versions()
    (folder / REPORT).write_text(json.dumps(report, indent=2))


def format_report(report: dict) -> str:
    """The report as a few readable lines (printed and logged at the end)."""
    s = report["split_counts"]
    before = report["before_kcore"]
    lines = [
        f"prepared {report['dataset']} -> {report['output']}",
        f"  {report['users']} users, {report['items']} items, {report['interactions']} interactions, "
        f"sparsity {report['sparsity']:.6f}",
        f"  split ({report['settings']['split']}, seed {report['settings']['seed']}): "
        f"train {s['train']}, valid {s['valid']}, test {s['test']}",
        f"  reviews: {report['review_lines']} lines, {report['review_malformed_lines']} malformed, "
        f"{report['duplicates_collapsed']} duplicates collapsed; "
        f"{report['settings']['k']}-core ({report['kcore_passes']} passes) kept "
        f"{report['interactions']} of {before['interactions']} interactions, "
        f"{report['users']} of {before['users']} users, {report['items']} of {before['items']} items",
    ]
    if report["inputs"]["meta"] is not None:
        lines.append(
            f"  metadata: {report['meta_lines']} lines, {report['meta_malformed_lines']} malformed, "
            f"{report['items_without_meta']} kept items without metadata"
        )
    else:
        lines.append("  metadata: none (prepare.meta not set)")
    lines.append(f"  report: {Path(report['output']) / REPORT}")
    return "\n".join(lines)
