"""What :mod:`mllmrec.bench` measures, declared as a table.

A :class:`Section` names the datasets it runs on (each one present under ``data_root``, in
order), its :class:`Step` s (a piece of :mod:`mllmrec.bench.pieces`, the inputs it needs, the
``bench.json`` keys it fills) and its :class:`Row` s of the printed table (ours beside a
baseline). The driver walks :data:`SECTIONS` in order: per dataset, every step that applies,
then every row whose ``ours`` step ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union


class Result(dict):
    """One piece's result; a field it does not have (it failed, or did not run) reads as None."""

    def __missing__(self, key):
        return None


class Results(dict):
    """One dataset's results by step name, plus ``ds`` (the dataset); a step that did not run
    reads as an empty :class:`Result`. Row texts are ``str.format_map`` templates over it:
    ``"{ds}"``, ``"{graph_ours[items]}"``."""

    def __missing__(self, key):
        return Result()


Text = Union[str, Callable[[Results], str]]  # a template over the Results, or a function of them
Fill = Union[str, Callable[[Results], Any]]  # a field of the step's result, or a function of the Results


def text(spec: Text, results: Results) -> str:
    return spec(results) if callable(spec) else spec.format_map(results)


def always(cfg, ds: str) -> bool:
    return True


def on_device(cfg, ds: str) -> dict:
    return {"device": cfg.device}


def on_cuda(cfg, ds: str) -> bool:
    return cfg.device == "cuda"


@dataclass(frozen=True)
class Step:
    """Run the piece ``piece`` with ``data_root``, ``dataset`` and ``inputs(cfg, dataset)``; then
    set each ``fills`` key (``{ds}``: the dataset) from the result."""

    name: str
    piece: str
    inputs: Callable[[Any, str], dict]
    fills: dict[str, Fill]
    when: Callable[[Any, str], bool] = always
    timeout: int = 3600  # seconds for the piece's interpreter

    def filled(self, results: Results) -> dict:
        mine = results[self.name]
        return {key.format(ds=results["ds"]): value(results) if callable(value) else mine[value]
                for key, value in self.fills.items()}


@dataclass(frozen=True)
class Row:
    """A table line: seconds of ``ours`` (step, field) beside ``baseline``'s, the memory columns
    from the same two steps' peak (when ``memory``), and a note."""

    label: Text
    ours: tuple[str, str]
    baseline: tuple[str, str] | None = None
    memory: bool = True
    note: Text = ""


@dataclass(frozen=True)
class Section:
    datasets: tuple[str, ...]
    steps: tuple[Step, ...]
    rows: tuple[Row, ...]


# ---------------------------------------------------------------------------- graph stage
def same_edges(r: Results) -> bool:
    """Did our sparse stage and the dense official-style algorithm build the same graph."""
    return bool(r["graph_ours"]["digest"] is not None and r["graph_ours"]["digest"] == r["graph_dense"]["digest"])


def graph_note(r: Results) -> str:
    return f"identical edges: {same_edges(r)}" if "graph_dense" in r else "dense: opt in with dense_clothing=true"


GRAPH = Section(
    datasets=("baby", "clothing"),
    steps=(
        Step("graph_ours", "graph_ours", on_device,
             {"graph.{ds}.seconds": "seconds", "graph.{ds}.peak_mb": "peak_mb", "graph.{ds}.edges": "edges"}),
        Step("graph_dense", "graph_dense", on_device,  # 23k clothing items: several GB dense, opt in
             {"graph.{ds}.dense_seconds": "seconds", "graph.{ds}.dense_peak_mb": "peak_mb",
              "graph.{ds}.identical_edges": same_edges},
             when=lambda cfg, ds: ds != "clothing" or bool(cfg.dense_clothing)),
    ),
    rows=(Row("graph, {ds} ({graph_ours[items]} items)", ("graph_ours", "seconds"), ("graph_dense", "seconds"),
              note=graph_note),),
)


# ---------------------------------------------------------------------------- training epoch
def ours_epochs(cfg, ds: str) -> dict:
    return {"device": cfg.device, "epochs": int(cfg.epochs)}


def official_epochs(cfg, ds: str) -> dict:
    return {"device": cfg.device, "epochs": 1 if ds == "sports" and cfg.device == "cpu" else 3}


def graphed_note(r: Results) -> str:
    floor_s, graphed_s = r["gemm_floor"]["seconds"], r["train_graphed"]["epoch_seconds"]
    ratio = f"{graphed_s / floor_s:.1f}x" if floor_s and graphed_s else "?"
    return f"baseline: cuda_graphs=false; = {ratio} the GEMM floor ({floor_s if floor_s is None else round(floor_s, 4)} s)"


def profile_note(r: Results) -> str:
    p = r["profile"]
    if not p:
        return ""
    e, c = p["eager"], p["captured"]
    return (f"eager {e['ms_per_step']:.2f} ms/step ({e['kernel_launches_per_step']:.0f} launches, GPU busy "
            f"{e['gpu_busy_ms_per_step']:.2f} ms); captured {c['ms_per_step']:.2f} ms/step "
            f"({c['kernel_launches_per_step']:.0f} launches + {c['graph_launches_per_step']:.0f} graph, "
            f"GPU busy {c['gpu_busy_ms_per_step']:.2f} ms); {p['steps_per_epoch']} steps/epoch")


def grid_step(name: str, graphs: str) -> Step:
    """The 16-cell sports grid (``grid=true`` on CUDA), with the captured step or without."""
    return Step(name, "grid", lambda cfg, ds: {"device": "cuda", "cuda_graphs": graphs,
                                               "launchers": list(cfg.get("grid_launchers") or ["sequential", "parallel"])},
                {f"grid.{{ds}}.cuda_graphs_{graphs}": lambda r: dict(r[name]) or None},
                when=lambda cfg, ds: on_cuda(cfg, ds) and bool(cfg.get("grid", False)) and ds == "sports",
                timeout=3000)


def grid_row(name: str, graphs: str) -> Row:
    def note(r: Results) -> str:
        g = r[name]
        return (f"baseline: sequential; completed {g['joblib4_completed']}/{g['sequential_completed']}; "
                f"stage cache {g['stage_cache_seconds'] or 0:.0f} s before, not included")

    return Row(f"16-cell grid, {{ds}}, joblib 4 jobs, cuda_graphs={graphs}", (name, "joblib4_seconds"),
               (name, "sequential_seconds"), memory=False, note=note)


TRAIN = Section(
    datasets=("office", "sports"),
    steps=(
        Step("train_ours", "train_ours", ours_epochs,
             {"train.{ds}.epoch_seconds": "epoch_seconds", "train.{ds}.peak_mb": "peak_mb"}),
        Step("train_official", "train_official", official_epochs,
             {"train.{ds}.official_loop_epoch_seconds": "epoch_seconds", "train.{ds}.official_loop_peak_mb": "peak_mb"}),
        Step("gemm_floor", "gemm_floor", on_device,
             {"train.{ds}.gemm_floor_seconds": "seconds", "train.{ds}.gemm_floor_train_seconds": "train_seconds",
              "train.{ds}.gemm_floor_eval_seconds": "eval_seconds"}),
        # CUDA: the captured training step (model.cuda_graphs), then the grid (grid=true)
        Step("train_graphed", "train_ours", lambda cfg, ds: {**ours_epochs(cfg, ds), "cuda_graphs": "true"}, {},
             when=on_cuda),
        grid_step("grid_plain", "false"),
        grid_step("grid_graphed", "true"),
        Step("profile", "profile_step", on_device, {"train.{ds}.profile": lambda r: r["profile"] or None},
             when=lambda cfg, ds: on_cuda(cfg, ds) and ds == "sports", timeout=900),
    ),
    rows=(
        Row("epoch (train+val), {ds}", ("train_ours", "epoch_seconds"), ("train_official", "epoch_seconds"),
            note="baseline: official loop structure"),
        Row("GEMM floor of that epoch, {ds}", ("gemm_floor", "seconds"), ("train_official", "epoch_seconds"),
            memory=False, note="matrix products alone; speed-up = the most any exact fp32 version can reach"),
        Row("epoch (train+val), {ds}, model.cuda_graphs=true", ("train_graphed", "epoch_seconds"),
            ("train_ours", "epoch_seconds"), note=graphed_note),
        grid_row("grid_plain", "false"),
        grid_row("grid_graphed", "true"),
        Row("one training step (profiled), {ds}, captured", ("profile", "seconds"), memory=False, note=profile_note),
    ),
)


# ---------------------------------------------------------------------------- evaluation
EVAL = Section(
    datasets=("sports",),
    steps=(Step("eval_ours", "eval_ours", on_device,
                {"eval.{ds}.seconds": "seconds", "eval.{ds}.users": "users"}),),
    rows=(Row("full-ranking eval, {ds}", ("eval_ours", "seconds"), note="{eval_ours[users]} users, all items"),),
)

SECTIONS = (GRAPH, TRAIN, EVAL)
