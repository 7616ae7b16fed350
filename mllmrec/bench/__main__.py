"""``python -m mllmrec.bench data_root=<folder with office/ baby/ sports/ clothing/>``

Side-by-side speed and memory: the driver walks the table of :mod:`mllmrec.bench.table`; each
measured piece (:mod:`mllmrec.bench.pieces`) runs in its own subprocess (so peak RSS is its own),
and the results go to a table on stdout and ``bench.json`` in the run dir:

- ``graph.<ds>``: our sparse graph stage vs a dense re-implementation of the official algorithm;
- ``train.<ds>``: our epoch (train + validation, Lightning) vs the official loop structure, and
  the GEMM floor of that epoch;
- ``eval.sports``: our full-ranking Recall/NDCG@10/20 over all validation users.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mllmrec.bench.table import SECTIONS, Result, Results, Row, Section, text

log = logging.getLogger("mllmrec.bench")


# ---------------------------------------------------------------------------- driver
def run_piece(piece: str, timeout: int = 3600, **kwargs) -> dict:
    """Run one piece in a fresh interpreter; its JSON result is the last stdout line."""
    cmd = [sys.executable, "-m", "mllmrec.bench.child", piece, json.dumps(kwargs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        log.error("%s %s failed: %s", piece, kwargs.get("dataset"), tail[0])
        return {"error": tail[0]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def run_section(section: Section, ds: str, cfg, root: Path, out: dict, pieces: dict) -> Results:
    """Run the section's steps that apply to ``ds``: each result goes to ``pieces``, its keys and
    errors to ``out``."""
    results = Results(ds=ds)
    only = cfg.get("steps")  # a list of step names: run those alone (e.g. steps=[grid_graphed])
    for step in section.steps:
        if not step.when(cfg, ds) or (only is not None and step.name not in only):
            continue
        result = run_piece(step.piece, timeout=step.timeout, data_root=str(root), dataset=ds, **step.inputs(cfg, ds))
        key = f"{step.piece}.{ds}"
        pieces[key if key not in pieces else f"{key}.{len(pieces)}"] = result
        if "error" in result:
            out["errors"].append(f"{step.piece} {ds}: {result['error']}")
        results[step.name] = Result(result)
        out.update(step.filled(results))
    return results


def run_bench(cfg) -> dict:
    """Every section on every dataset of it found under ``cfg.data_root``; bench.json's content."""
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        from mllmrec.errors import ConfigError

        raise ConfigError("data_root", f"{root} is not a folder (it should hold baby/, sports/, clothing/)")
    out: dict = {"device": cfg.device, "data_root": str(root), "cpu_count": os.cpu_count(), "errors": []}
    if cfg.device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    mem_key = "gpu_peak_mb" if cfg.device == "cuda" else "peak_mb"  # the table's memory columns
    rows, pieces = [], {}  # pieces: every piece's full result (GPU memory included)
    for section in SECTIONS:
        for ds in section.datasets:
            if (root / ds).is_dir():
                results = run_section(section, ds, cfg, root, out, pieces)
                rows += [table_row(row, results, mem_key) for row in section.rows if row.ours[0] in results]
    out["pieces"] = pieces
    out["table"] = format_table(rows, "GPU peak MB" if cfg.device == "cuda" else "peak MB")
    return out


# ---------------------------------------------------------------------------- table
def table_row(row: Row, results: Results, mem_key: str) -> tuple:
    """(name, ours s, ours MB, baseline s, baseline MB, note) of one row."""
    ours = results[row.ours[0]]
    base = results[row.baseline[0]] if row.baseline else Result()
    return (text(row.label, results), ours[row.ours[1]], ours[mem_key] if row.memory else None,
            base[row.baseline[1]] if row.baseline else None, base[mem_key] if row.memory else None,
            text(row.note, results))


def _fmt(v, unit=""):
    return "-" if v is None else f"{v:.2f}{unit}"


def format_table(rows, mem: str = "peak MB") -> str:
    head = (f"| piece | ours s | ours {mem} | baseline s | baseline {mem} | speed-up | memory ratio | note |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, s, mb, bs, bmb, note in rows:
        speed = f"{bs / s:.1f}x" if s and bs else "-"
        ratio = f"{bmb / mb:.1f}x" if mb and bmb else "-"
        lines.append(f"| {name} | {_fmt(s)} | {_fmt(mb, '')} | {_fmt(bs)} | {_fmt(bmb)} | {speed} | {ratio} | {note} |")
    return "\n".join(lines)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from mllmrec import config as mconfig
    from mllmrec.errors import report_errors
    from mllmrec.files import write_text_atomic

    @hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="bench")
    @report_errors
    def _main(cfg) -> None:
        result = run_bench(cfg)
        out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
        write_text_atomic(out, json.dumps(result, indent=2))
        print(result["table"])
        print(f"\nbench.json: {out}")
        if result["errors"]:
            print("error: " + "; ".join(result["errors"]), file=sys.stderr)
            raise SystemExit(1)

    _main()


if __name__ == "__main__":
    main()
