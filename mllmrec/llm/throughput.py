"""Throughput of the reason stage on a real engine, side by side in one run (docs/llm.md):
offline ``llm=vllm`` and ``vllm serve`` + ``llm=openai`` at each concurrency, same prompts, same
sampling, each into a fresh cache (nothing reused)::

    .venv-llm/bin/python -m mllmrec.llm.throughput                       # llm=tiny, tiny fixture
    .venv-llm/bin/python -m mllmrec.llm.throughput --users 20 --concurrency 1 8 --out figures.json

Prints one JSON object: per run the engine load seconds, requests, generation seconds,
requests/s, generated tokens and tokens/s, and three example answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from mllmrec.errors import report_errors

REPO = Path(__file__).resolve().parents[2]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


def _reason(overrides: list[str]) -> dict:
    """One reason run; the figures come from its manifest."""
    import pandas as pd

    from mllmrec.pipeline import build_inputs

    art = build_inputs(_compose(overrides), until="reason").artifacts["reason"]
    c = art.manifest["counts"]
    users = pd.read_parquet(art.file("users.parquet"))
    answered = users[users.finish_reason.isin(["stop", "length"])]
    secs = c["generation_seconds"]
    return {"requests": c["generated_now"], "generation_seconds": secs,
            "requests_per_second": round(c["generated_now"] / secs, 3),
            "completion_tokens": c["completion_tokens"], "prompt_tokens": c["prompt_tokens"],
            "generated_tokens_per_second": round(c["completion_tokens"] / secs, 1),
            "finish_reasons": c["finish_reasons"],
            "examples": answered.head(3)[["userID", "text"]].to_dict("records")}


def measure(model: Path, data_dir: Path, users: int, concurrency: list[int], work: Path) -> dict:
    from mllmrec.llm import backends, serve
    from mllmrec.llm.settings import LLMSettings

    base = [f"dataset.data_dir={data_dir}", f"dataset.name={data_dir.name}", f"llm.model={model}",
            f"llm.limit={users}", f"paths.output_dir={work}"]
    out: dict = {"model": str(model), "users": users}
    started = time.perf_counter()
    backends.make_backend(LLMSettings.from_config(_compose(base + ["llm=tiny"]).llm)).close()  # load once, timed
    out["offline_engine_load_seconds"] = round(time.perf_counter() - started, 1)
    out["offline_vllm"] = _reason(base + ["llm=tiny", f"paths.cache_dir={work}/offline"])
    backends.release_engines()
    with serve.vllm_server(model, work / "serve.log") as srv:
        out["serve_load_seconds"] = round(srv["load_seconds"], 1)
        for c in concurrency:
            out[f"openai_concurrency_{c}"] = _reason(base + [
                "llm=openai", f"llm.base_url={srv['base']}/v1", f"llm.concurrency={c}", "llm.sampling.top_k=64",
                "llm.sampling.max_tokens=96", f"paths.cache_dir={work}/openai-{c}"])
    return out


@report_errors
def main(argv: list[str] | None = None) -> None:
    from mllmrec.llm import convert

    p = argparse.ArgumentParser(prog="python -m mllmrec.llm.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--data-dir", type=Path, default=REPO / "tests" / "fixtures" / "tiny")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = convert.convert()
    with tempfile.TemporaryDirectory(prefix="mllmrec-throughput-") as tmp:
        figures = measure(model, args.data_dir.resolve(), args.users, args.concurrency, Path(tmp))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
