"""``python -m mllmrec.bench.scale sizes=[USERSxITEMSxINTERACTIONS,...] models=[...] out=DIR``

The cost curve of mllmrec from a paper-sized dataset to a million users: for each size, a synthetic
dataset (:mod:`mllmrec.bench.synthetic`, cached under ``DIR/data``), then each stage in its own
process (:func:`mllmrec.bench.run_piece`, so that its peak RSS is its own; the stages are
:mod:`mllmrec.bench.scale_pieces`): ``load``, ``knn`` (K_s candidates), ``cooccurrence`` (Jaccard
top-K_c), ``graph`` (refined graph + propagation), then per model ``build``, ``epoch`` (one training
epoch) and ``eval`` (one full-ranking evaluation of every test user), and the popularity ranking
(``model: pop``). ``INTERACTIONS`` is the number of rows asked of the generator (train + valid +
test, before its 5-core); the rows also carry the counts the dataset really has.

Writes ``DIR/scale.json`` (a list of rows: ``users``, ``items``, ``interactions``, ``model``,
``stage``, ``seconds``, ``peak_rss_mb``, ...; a stage that failed has ``seconds: null`` and an
``error`` line), ``DIR/scale.md`` (the table and each stage's fitted log-log slope) and
``DIR/scale.png`` (time and peak RSS against training interactions, one line per model and stage).
Each finished row is saved at once, so a long ladder can be watched and a crash loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import re
import shutil
import sys
from pathlib import Path

from mllmrec.errors import ConfigError

log = logging.getLogger("mllmrec.bench.scale")

GRAPH_STAGES = ("load", "knn", "cooccurrence", "graph")
MODEL_STAGES = ("build", "epoch", "eval")
SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text) -> tuple[int, int, int]:
    m = SIZE.match(str(text))
    if not m:
        raise ConfigError("sizes", f"each size is USERSxITEMSxINTERACTIONS (e.g. 35600x18400x296000), got {text!r}")
    return tuple(int(v) for v in m.groups())


def size_label(size: tuple[int, int, int]) -> str:
    return "x".join(str(v) for v in size)


# ---------------------------------------------------------------------------- driver
def dataset_for(size, cfg, root: Path) -> tuple[Path, dict]:
    """The synthetic dataset of ``size`` under ``root`` (generated once, reused while its spec matches)."""
    from mllmrec.bench.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(users=size[0], items=size[1], interactions=size[2], seed=int(cfg.seed))
    folder = root / f"{size_label(size)}_s{cfg.seed}"
    meta = folder / "synthetic.json"
    if meta.is_file():
        summary = json.loads(meta.read_text())
        if summary.get("spec") == json.loads(json.dumps(spec.__dict__)):
            return folder, summary
    return folder, generate(spec, folder, name="synthetic", overwrite=True)


def _row(size, summary, model, stage, result) -> dict:
    row = {"users": size[0], "items": size[1], "interactions": size[2], "size": size_label(size),
           "n_users": summary["users"], "n_items": summary["items"], "n_interactions": summary["interactions"],
           "train_interactions": summary["train"], "model": model, "stage": stage,
           "seconds": result.get("seconds"), "peak_rss_mb": result.get("peak_rss_mb")}
    if "error" in result:
        row["error"] = result["error"]
    row.update({k: v for k, v in result.items() if k not in row and k != "error"})
    return row


def run_stage(piece: str, timeout: int, **kwargs) -> dict:
    """One stage in a fresh interpreter (:mod:`mllmrec.bench.child`, as :func:`mllmrec.bench.run_piece`);
    a failure, a kill (out of memory) or a timeout comes back as ``{"error": one line}``."""
    cmd = [sys.executable, "-m", "mllmrec.bench.child", piece, json.dumps(kwargs)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        if proc.returncode < 0:
            return {"error": f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")}
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def run_scale(cfg, out: Path, on_row=None) -> list[dict]:
    """Every size x stage x model; returns the rows (``on_row(rows)`` after each)."""
    sizes = [parse_size(s) for s in cfg.sizes]
    models = [str(m) for m in cfg.models]
    unknown = [m for m in models if not (Path(__file__).parents[2] / "conf" / "model" / f"{m}.yaml").is_file()]
    if unknown:
        raise ConfigError("models", f"no conf/model/{unknown[0]}.yaml")
    rows: list[dict] = []
    root = Path(str(cfg.data_root)).expanduser()
    timeout = int(cfg.timeout_s)

    def add(size, summary, model, stage, result):
        rows.append(_row(size, summary, model, stage, result))
        if "error" in result:
            log.error("%s %s %s: %s", size_label(size), model, stage, result["error"])
        else:
            log.info("%s %s %s: %.1f s, peak %.0f MB", size_label(size), model, stage, result["seconds"],
                     result["peak_rss_mb"])
        if on_row is not None:
            on_row(rows)

    for size in sizes:
        data_dir, summary = dataset_for(size, cfg, root)
        log.info("%s: %s (%d users, %d items, %d train interactions)", size_label(size), data_dir, summary["users"],
                 summary["items"], summary["train"])
        work = out / "work" / size_label(size)
        work.mkdir(parents=True, exist_ok=True)
        common = {"work": str(work), "data_dir": str(data_dir), "seed": int(cfg.seed)}
        features = str(data_dir / "text_feat.npy")
        args = {"load": {"name": "synthetic"},
                "knn": {"features": features, "k_s": int(cfg.k_s), "knn": str(cfg.knn)},
                "cooccurrence": {"k_c": int(cfg.k_c)},
                "graph": {"features": features, "alpha": float(cfg.alpha), "layers": int(cfg.layers)}}
        result = run_stage("scale_load", timeout, **common, **args["load"])
        add(size, summary, "all", "load", result)
        if "error" in result:
            continue  # no data: nothing else can run
        graph_error = None
        if "mllmrec" in models:
            for stage in GRAPH_STAGES[1:]:
                result = ({"error": f"skipped: {graph_error}"} if graph_error else
                          run_stage(f"scale_{stage}", timeout, **common, **args[stage]))
                graph_error = graph_error or (f"{stage} failed" if "error" in result else None)
                add(size, summary, "mllmrec", stage, result)
        for model in models:
            _model_stages(lambda *a: add(size, summary, *a), cfg, model, common, timeout,
                          graph_error if model == "mllmrec" else None)
        if cfg["pop"]:  # not cfg.pop: that is DictConfig.pop, a method
            add(size, summary, "pop", "eval", run_stage("scale_pop", timeout, budget_s=float(cfg.eval_budget_s), **common))
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def _model_stages(add, cfg, model: str, common: dict, timeout: int, graph_error: str | None) -> None:
    """One model's build, epoch and eval rows at one size (``add(model, stage, result)``); all skipped
    when the graph stages it needs failed."""
    if graph_error:
        for stage in MODEL_STAGES:
            add(model, stage, {"error": f"skipped: {graph_error}"})
        return
    res = run_stage("scale_epoch", timeout, model=model, budget_s=float(cfg.epoch_budget_s), knn=str(cfg.knn), **common)
    if "error" in res:
        add(model, "build", res)
        add(model, "epoch", {"error": "skipped: build or epoch failed"})
    else:
        add(model, "build", {"seconds": res["build_seconds"], "peak_rss_mb": res["build_peak_rss_mb"]})
        add(model, "epoch", res)
    add(model, "eval", run_stage("scale_eval", timeout, model=model, knn=str(cfg.knn), budget_s=float(cfg.eval_budget_s),
                                 **common))


# ---------------------------------------------------------------------------- reports
def fitted_slopes(rows: list[dict], key: str) -> dict[tuple[str, str], float]:
    """Least-squares slope of log(key) against log(training interactions), per (model, stage),
    over the sizes where it was measured (at least two)."""
    import numpy as np

    out = {}
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        if r.get(key) and r.get("train_interactions"):
            groups.setdefault((r["model"], r["stage"]), []).append((r["train_interactions"], r[key]))
    for name, pts in groups.items():
        xs = sorted(dict(pts).items())
        if len(xs) >= 2 and xs[0][0] != xs[-1][0]:
            x = np.log([p[0] for p in xs])
            y = np.log([max(p[1], 1e-6) for p in xs])
            out[name] = float(np.polyfit(x, y, 1)[0])
    return out


def _fmt(v, digits=1):
    return "-" if v is None else (f"{v:,.{digits}f}" if isinstance(v, float) else str(v))


def markdown(rows: list[dict]) -> str:
    lines = ["| size (asked) | users | items | train | model | stage | seconds | CPU s | peak RSS MB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or ""
        if r.get("extrapolated") and r["stage"] == "epoch":
            note = f"extrapolated from {r['steps']} of {r['steps_total']} steps ({r['measured_seconds']:.0f} s)"
        elif r.get("extrapolated"):
            note = f"extrapolated from {r['users_done']:,} of {r['users']:,} users ({r['measured_seconds']:.0f} s); "
        if r["stage"] == "eval" and "test/recall@20" in r:
            note += f"test R@20 {r['test/recall@20']:.4f}" + ("" if r.get("after_one_epoch", True) else " (untrained)")
        if r.get("note"):  # a remark added to the row afterwards (e.g. docs/scale.md's merged runs)
            note = f"{note}; {r['note']}" if note else r["note"]
        lines.append(f"| {r['size']} | {r['n_users']:,} | {r['n_items']:,} | {r['train_interactions']:,} | {r['model']} "
                     f"| {r['stage']} | {_fmt(r['seconds'])} | {_fmt(r.get('cpu_seconds'))} | {_fmt(r['peak_rss_mb'], 0)} | {note} |")
    t, c, m = (fitted_slopes(rows, k) for k in ("seconds", "cpu_seconds", "peak_rss_mb"))
    lines += ["", "Fitted log-log slopes against training interactions:", "",
              "| model | stage | time slope | CPU time slope | peak RSS slope |", "|---|---|---|---|---|"]
    for name in sorted(set(t) | set(m)):
        lines.append(f"| {name[0]} | {name[1]} | {_fmt(t.get(name), 2)} | {_fmt(c.get(name), 2)} | {_fmt(m.get(name), 2)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllmrec.files import atomic_file

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, label in ((axes[0], "seconds", "seconds"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        slopes = fitted_slopes(rows, key)
        groups: dict = {}
        for r in rows:
            if r.get(key):
                groups.setdefault((r["model"], r["stage"]), []).append((r["train_interactions"], r[key]))
        for (model, stage), pts in sorted(groups.items()):
            pts = sorted(pts)
            slope = slopes.get((model, stage))
            name = f"{model}/{stage}" + ("" if slope is None else f" ({slope:.2f})")
            stages = GRAPH_STAGES + MODEL_STAGES
            color = plt.get_cmap("tab10")(stages.index(stage) % 10 if stage in stages else 9)
            style = {"lightgcn": "--", "freedom": ":", "pop": "-."}.get(model, "-")  # color: stage, line: model
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, linestyle=style, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training interactions")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_title("time per stage (fitted slope)")
    axes[1].set_title("peak RSS per stage (fitted slope)")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save(rows: list[dict], out: Path, with_plot: bool = True) -> None:
    from mllmrec.files import write_text_atomic

    write_text_atomic(out / "scale.json", json.dumps(rows, indent=2))
    write_text_atomic(out / "scale.md", markdown(rows))
    if with_plot and rows:
        plot(rows, out / "scale.png")


def main() -> None:
    import hydra

    from mllmrec import config as mconfig
    from mllmrec.errors import report_errors

    @hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="scale")
    @report_errors
    def _main(cfg) -> None:
        for s in cfg.sizes:
            parse_size(s)  # every size checked before any work
        out = Path(str(cfg.out)).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        rows = run_scale(cfg, out, on_row=lambda rows: save(rows, out, with_plot=False))
        save(rows, out, with_plot=bool(cfg.plot))
        print(markdown(rows))
        print(f"scale.json, scale.md{', scale.png' if cfg.plot else ''}: {out}")
        if any("error" in r for r in rows):
            print("some stages failed (their rows say why)", file=sys.stderr)

    _main()


if __name__ == "__main__":
    main()
