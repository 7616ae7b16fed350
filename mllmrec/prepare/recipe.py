"""The whole preparation, step by step (each step is a module of :mod:`mllmrec.prepare`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mllmrec.prepare.ids import renumber
from mllmrec.prepare.job import check_job
from mllmrec.prepare.kcore import apply_kcore
from mllmrec.prepare.metadata import load_metadata
from mllmrec.prepare.report import build_report, format_report, save_report
from mllmrec.prepare.reviews import load_reviews
from mllmrec.prepare.split import split_labels
from mllmrec.prepare.write import check_destination, publishing, write_dataset_files

log = logging.getLogger(__name__)


def prepare(
    name: str, reviews: str | Path, meta: str | Path | None, dest: str | Path, *, k: int = 5, split: str = "random",
    seed: int = 999, strict: bool = False, overwrite: bool = False, progress: bool = True,
) -> dict:
    """Build the MMRec-format dataset ``dest`` (a folder named after the dataset) and return the report.

    ``meta=None`` writes no ``meta-<name>.csv`` (every item then counts as without metadata)."""
    start = time.perf_counter()
    job = check_job(name, reviews, meta, dest, k=k, split=split, seed=seed, strict=strict)
    check_destination(job.dest, overwrite)  # refuse before reading gigabytes
    deduped, n_dup = load_reviews(job.reviews, strict=strict, progress=progress)
    kept, kcore = apply_kcore(deduped, k, job.reviews)
    del deduped  # only the k-core is kept in memory from here on
    table = renumber(kept)
    labels = split_labels(table.users, table.times, rule=split, seed=seed)
    meta_rows, meta_stats = load_metadata(job.meta, table.item_names, name, strict=strict, progress=progress)
    report = build_report(job, table, labels, kept.stats, n_dup, kcore, meta_stats)
    with publishing(job.dest, overwrite) as tmp:
        write_dataset_files(tmp, name, table.frame(labels), table.user_names, table.item_names, meta_rows)
        save_report(tmp, report, start)
    log.info("%s", format_report(report))
    return report
