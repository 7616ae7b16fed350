"""Prepare stage: the ``prepare`` config node -> an MMRec-format dataset folder (``prepare.output_dir``).

The steps are in :mod:`mllmrec.prepare`; ``python -m stages.prepare`` is the command line.
"""

from __future__ import annotations

from typing import Mapping

from mllmrec.errors import ConfigError
from mllmrec.prepare import format_report, prepare

STAGE = "prepare"
CONFIGURED = ("baby", "sports", "clothing")  # conf/dataset/<name>.yaml (default folder <paths.data_dir>/<name>)


def run(cfg: Mapping, name: str, *, default_seed: int | None = None) -> dict:
    """Prepare dataset ``name`` as the ``prepare`` node ``cfg`` says; return the report.

    ``default_seed`` (the global seed) seeds the split when ``cfg.seed`` is null."""
    if not cfg.get("reviews"):
        raise ConfigError("prepare.reviews", "required: the raw reviews file (reviews_<Category>.json.gz)")
    seed = cfg.get("seed")
    return prepare(
        name,
        cfg["reviews"],
        cfg.get("meta") or None,
        cfg["output_dir"],
        k=cfg["k"],
        split=cfg["split"],
        seed=int(default_seed if seed is None else seed),
        strict=bool(cfg["strict"]),
        overwrite=bool(cfg["overwrite"]),
        progress=bool(cfg.get("progress", True)),
    )


def summary(report: dict) -> str:
    """The report in a few lines, then the command that trains on the prepared folder."""
    name, out = report["dataset"], report["output"]
    group = f"dataset={name}" if name in CONFIGURED else f"dataset.name={name}"
    return f"{format_report(report)}\ntrain with: python -m mllmrec.train {group} dataset.data_dir={out}"
