"""The bench's GPU grid piece (issue 13): the whole 16-cell alpha x K_c grid through the real CLI,
sequential (Hydra's basic launcher) vs ``hydra/launcher=parallel`` (joblib) with 4 jobs; its rows
(and the captured-step epoch beside the GEMM floor) are declared in :mod:`mllmrec.bench.table`.

The grid runs ``python -m mllmrec.train -m`` as a user would (early stopping on), on random unit
inputs (``encoder.model=random``, as the other timing pieces): the stage cache is built once first
(``stages.graph``, timed and given in the grid row's note), and both grids then start from it, so the
two are compared on equal terms; each grid's wall time includes every job's start-up. Opt in with
``grid=true`` (it trains 16 models twice).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mllmrec.metrics import EvalSpec


def _cli(module: str, args: list[str], timeout: int) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env)
    return time.perf_counter() - start, proc


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    return next((ln for ln in lines if ln.startswith("error")), lines[-1] if lines else "?")


def piece_grid(data_root, dataset, device="cuda", n_jobs=4, cuda_graphs="false", timeout=3600, extra=(),
               launchers=("sequential", "parallel"), **_):
    """Wall seconds of the 16-cell grid, sequential and/or with ``n_jobs`` joblib jobs (``launchers``), on
    one stage cache."""
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix=f"mllmrec-grid-{dataset}-"))
    common = [f"dataset={dataset}", f"dataset.data_dir={Path(data_root) / dataset}", f"paths.output_dir={work}",
              f"paths.cache_dir={work / 'cache'}", "encoder.model=random", "logger=none", "trainer.enable_progress_bar=false",
              f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]
    try:
        stage_s, proc = _cli("stages.graph", [*common, f"hydra.run.dir={work / 'stage'}"], timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"stages.graph failed: {_last_error(proc)}")
        out = {"stage_cache_seconds": stage_s}
        runs = {"sequential": ("sequential", []),
                "parallel": (f"joblib{n_jobs}", ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}"])}
        for label, launcher in (runs[name] for name in launchers):
            sweep = work / label
            seconds, proc = _cli("mllmrec.train", [*common, f"model.cuda_graphs={cuda_graphs}", f"hydra.sweep.dir={sweep}",
                                                   *extra, *launcher, "-m"], timeout)
            summary = sweep / "summary.csv"
            df = pd.read_csv(summary) if summary.is_file() else None
            out[f"{label}_seconds"] = seconds
            out[f"{label}_completed"] = int((df["status"] == "completed").sum()) if df is not None else 0
            select = EvalSpec.default().select  # the grid runs at the default conf/eval
            out[f"{label}_best_{select.replace('/', '_')}"] = float(df[select].max()) if df is not None else None
            out[f"{label}_epochs_total"] = int(df["epochs"].sum()) if df is not None else None
            if proc.returncode != 0:
                out[f"{label}_error"] = _last_error(proc)
    finally:  # the work folder goes whatever happens (a failed stage, a timeout)
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":  # python -m mllmrec.bench.grid <data_root> <dataset> <device> [override ...]
    print(json.dumps(piece_grid(sys.argv[1], sys.argv[2], sys.argv[3], extra=sys.argv[4:]), indent=2))
