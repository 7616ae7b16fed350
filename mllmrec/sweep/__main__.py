"""Summarise multirun sweeps again: ``python -m mllmrec.sweep SWEEP_DIR [SWEEP_DIR ...] [--into DIR]``.

The end-of-multirun summary (:class:`mllmrec.sweep.summary.SweepSummary`) runs once, when a multirun
ends. This writes it again from the job folders:

* one dir: its ``summary.csv``, tables and charts anew (after jobs were added or rerun by hand);
* several dirs (e.g. a model's seeds run after the rest of ``experiment=baselines``): their job folders
  are linked into ``--into`` (a new folder), numbered one after another, and summarised as one sweep.

The settings (dataset, ``eval``) come from the first job's ``.hydra/config.yaml``; nothing is logged to
W&B. Exit status 1 when a job failed (as at the end of a multirun), 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from omegaconf import OmegaConf

from mllmrec.errors import ConfigError, report_errors
from mllmrec.sweep.summary import SweepSummary


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (``<n>_...`` with a ``.hydra`` folder), in job order."""
    jobs = [p.parent for p in sweep_dir.glob("*/.hydra")]
    if not jobs:
        raise ConfigError("sweep_dir", f"{sweep_dir}: no job folders (*/.hydra) in it")
    return sorted(jobs, key=lambda p: int(re.match(r"(\d*)", p.name).group(1) or 0))


def link_jobs(sweeps: list[Path], into: Path) -> None:
    """Link every job folder of ``sweeps`` into the new folder ``into``, renumbered 0, 1, ..."""
    jobs = [job for sweep in sweeps for job in job_dirs(sweep)]  # all checked before anything is written
    if into.exists():
        raise ConfigError("--into", f"{into} exists; give a new folder")
    into.mkdir(parents=True)
    for n, job in enumerate(jobs):
        (into / re.sub(r"^\d*", str(n), job.name, count=1)).symlink_to(job.resolve(), target_is_directory=True)


def summarize(sweep_dir: Path) -> None:
    first = job_dirs(sweep_dir)[0]
    config = OmegaConf.load(first / ".hydra" / "config.yaml")
    config.logger = None  # the summary goes to files only
    config.hydra = {"sweep": {"dir": str(sweep_dir)}}
    SweepSummary().on_multirun_end(config)


@report_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllmrec.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun sweep folders")
    parser.add_argument("--into", type=Path, help="with several sweep dirs: the new folder that joins them")
    args = parser.parse_args(argv)
    if len(args.sweep_dirs) > 1 and args.into is None:
        raise ConfigError("--into", "several sweep dirs are joined into a new folder: give --into DIR")
    if args.into is not None:
        link_jobs(args.sweep_dirs, args.into)
    summarize(args.into or args.sweep_dirs[0])


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    main()
