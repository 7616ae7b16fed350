"""Prepare stage: raw Amazon 2014 reviews + metadata -> an MMRec-format dataset folder.

    python -m stages.prepare dataset.name=<name> prepare.reviews=<reviews_*.json.gz> prepare.meta=<meta_*.json.gz>

writes ``<paths.data_dir>/<name>/`` (``prepare.output_dir``); the logic is in :mod:`mllmrec.prepare`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.errors import ConfigError, report_errors
from mllmrec.prepare import format_report, prepare

STAGE = "prepare"
CONFIGURED = ("baby", "sports", "clothing")  # conf/dataset/<name>.yaml (default folder <paths.data_dir>/<name>)


def run(cfg: DictConfig) -> dict:
    p = cfg.prepare
    if not p.get("reviews"):
        raise ConfigError("prepare.reviews", "required: the raw reviews file (reviews_<Category>.json.gz)")
    seed = p.get("seed")
    return prepare(
        cfg.dataset.name,
        p.reviews,
        p.get("meta") or None,
        p.output_dir,
        k=p.k,
        split=p.split,
        seed=int(cfg.seed if seed is None else seed),
        strict=bool(p.strict),
        overwrite=bool(p.overwrite),
        progress=bool(p.get("progress", True)),
    )


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="stage")
@report_errors
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    print(format_report(report))
    name, out = report["dataset"], report["output"]
    group = f"dataset={name}" if name in CONFIGURED else f"dataset.name={name}"
    print(f"train with: python -m mllmrec.train {group} dataset.data_dir={out}")


if __name__ == "__main__":
    main()
