"""Prepare stage: raw Amazon 2014 reviews + metadata -> an MMRec-format dataset folder.

    python -m stages.prepare dataset.name=<name> prepare.reviews=<reviews_*.json.gz> prepare.meta=<meta_*.json.gz>

writes ``<paths.data_dir>/<name>/`` (``prepare.output_dir``); the logic is in :mod:`mllmrec.stages.prepare`
and :mod:`mllmrec.prepare`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.errors import report_errors
from mllmrec.stages.prepare import STAGE, run, summary

__all__ = ["STAGE", "main"]


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="stage")
@report_errors
def main(cfg: DictConfig) -> None:
    print(summary(run(cfg.prepare, cfg.dataset.name, default_seed=cfg.get("seed"))))


if __name__ == "__main__":
    main()
