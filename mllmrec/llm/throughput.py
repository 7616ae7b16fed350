"""Throughput of the reason stage on a real engine, side by side in one run (docs/llm.md): the
official client's loop beside our engines, same model, same prompts, same sampling::

    .venv-llm/bin/python -m mllmrec.llm.throughput                       # llm=tiny, tiny fixture
    .venv-llm/bin/python -m mllmrec.llm.throughput --data-dir /data/office --users 200 \\
        --modes sequential offline served --concurrency 1 8 --out table.json

Modes (each run into a fresh cache, nothing reused):

- ``sequential``: what ``reasoning/6preference-generation.py`` of the official code does (one
  request to a local server, wait for the answer, the next; the CSV rewritten every 10 users),
  against ``vllm serve`` with the ``llm=tiny`` engine instead of Ollama;
- ``offline``: the reason stage with ``llm=tiny`` (vLLM's offline engine, chunks of
  ``llm.chunk_size`` scheduled together); ``--variant LABEL:key=value,...`` adds offline runs with
  other engine options (``chunk_size`` is ``llm.chunk_size``; every other key goes to
  ``llm.engine_extra``), e.g. ``--variant noprefix:enable_prefix_caching=false``;
- ``served``: the reason stage with ``llm=openai`` against the same server, once per
  ``--concurrency``.

Writes ``--out`` (JSON: a list of rows, or CSV when the name ends in .csv): per run ``mode``,
``concurrency``, ``variant``, ``requests``, ``engine_load_seconds``, ``generation_seconds``,
``requests_per_s``, ``prompt_tokens_per_s``, ``generated_tokens_per_s``, ``ratio_to_sequential``,
``texts_identical`` (every answer equal to the first mode's, user by user), the load average
around the run, and the prompt fitting time. Prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import yaml

from mllmrec.errors import ConfigError, one_line, report_errors

REPO = Path(__file__).resolve().parents[2]
MODES = ("sequential", "offline", "served")
log = logging.getLogger("mllmrec.llm.throughput")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``LABEL:key=value,key=value`` -> (label, Hydra overrides of the llm=tiny preset)."""
    label, sep, body = text.partition(":")
    if not sep or not label:
        raise ConfigError("--variant", f"expected LABEL:key=value[,key=value...], got {text!r}")
    overrides = []
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError("--variant", f"{label}: expected key=value, got {item!r}")
        yaml.safe_load(value)  # a YAML scalar, as Hydra reads it
        overrides.append(f"llm.chunk_size={value}" if key == "chunk_size" else f"++llm.engine_extra.{key}={value}")
    return label, overrides


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _row(mode: str, requests: int, seconds: float, prompt_tokens: int, completion_tokens: int, load_s: float,
         texts: dict[int, str], **extra) -> dict:
    return {"mode": mode, "concurrency": extra.pop("concurrency", None), "variant": extra.pop("variant", None),
            "requests": requests, "engine_load_seconds": round(load_s, 1),
            "generation_seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 4),
            "prompt_tokens": prompt_tokens, "generated_tokens": completion_tokens,
            "prompt_tokens_per_s": round(prompt_tokens / seconds, 1),
            "generated_tokens_per_s": round(completion_tokens / seconds, 1), **extra, "_texts": texts}


def _reason(mode: str, overrides: list[str], load_s: float, **extra) -> dict:
    """One reason-stage run; the figures come from its manifest, the texts from its artifact."""
    import pandas as pd

    from mllmrec.pipeline import build_inputs

    before = _load_avg()
    art = build_inputs(_compose(overrides), until="reason").artifacts["reason"]
    c = art.manifest["counts"]
    users = pd.read_parquet(art.file("users.parquet"))
    answered = users[users.finish_reason.isin(["stop", "length"])]
    texts = {int(u): str(t).strip() for u, t in zip(answered.userID, answered.text)}
    return _row(mode, c["generated_now"], c["generation_seconds"], c["prompt_tokens"], c["completion_tokens"],
                load_s, texts, finish_reasons=c["finish_reasons"], load_average=[before, _load_avg()], **extra)


def prompts_for(overrides: list[str]):
    """The requests the reason stage sends for these overrides (``llm.limit`` users), built as the
    stage builds them, and the seconds that took (prompt fitting, with the model's tokenizer)."""
    from mllmrec.llm import runner
    from mllmrec.llm.settings import LLMSettings
    from mllmrec.pipeline import load_data
    from mllmrec.stages import reason
    from mllmrec.texts import item_texts

    cfg = _compose(overrides)
    llm = LLMSettings.from_config(cfg.llm)
    data = load_data(cfg)
    rs = reason.ReasonSettings.from_config(cfg.reason)
    texts = item_texts(data)
    candidates = [u for u, items in enumerate(data.history(rs.history)) if len(items)]
    picked = runner.pick("reason", candidates, llm.selection)
    started = time.perf_counter()
    requests, counts = reason.build_requests(rs, llm.model, data, texts, users=picked.chosen)
    return requests, time.perf_counter() - started, counts, llm


def sequential(base_url: str, model: str, requests: Sequence, sampling: dict, csv_path: Path,
               load_s: float, timeout: float = 600.0) -> dict:
    """The official loop: for each user, POST one chat request, wait, keep the answer; every 10
    users the whole CSV is written again (as the official script does with ``to_csv``)."""
    import httpx
    import pandas as pd

    texts, rows, prompt_tokens, completion_tokens, finish = {}, [], 0, 0, {}
    before = _load_avg()
    started = time.perf_counter()
    with httpx.Client(timeout=timeout) as client:
        for n, req in enumerate(requests, start=1):
            resp = client.post(f"{base_url}/v1/chat/completions",
                               json={"model": model, "messages": req.messages(), **sampling})
            resp.raise_for_status()
            body = resp.json()
            choice = body["choices"][0]
            text = (choice["message"]["content"] or "").strip()
            texts[req.id] = text
            prompt_tokens += int(body["usage"]["prompt_tokens"])
            completion_tokens += int(body["usage"]["completion_tokens"])
            reason = str(choice.get("finish_reason"))
            finish[reason] = finish.get(reason, 0) + 1
            rows.append({"userID": req.id, "preference": text})
            if n % 10 == 0 or n == len(requests):
                pd.DataFrame(rows).to_csv(csv_path, index=False)
    seconds = time.perf_counter() - started
    return _row("sequential", len(requests), seconds, prompt_tokens, completion_tokens, load_s, texts,
                finish_reasons=dict(sorted(finish.items())), load_average=[before, _load_avg()])


def measure(model: Path, data_dir: Path, users: int, modes: Sequence[str], concurrency: Sequence[int],
            variants: Sequence[tuple[str, list[str]]], work: Path) -> list[dict]:
    from mllmrec.llm import backends, serve
    from mllmrec.llm.settings import LLMSettings

    base = [f"dataset.data_dir={data_dir}", f"dataset.name={data_dir.name}", f"llm.model={model}",
            f"llm.limit={users}", f"paths.output_dir={work}", "describe.enabled=false"]
    requests, fit_s, fit_counts, tiny = prompts_for(base + ["llm=tiny"])
    log.info("throughput: %d requests; prompts built and fitted in %.2f s (%d fitted to reason.max_prompt_tokens)",
             len(requests), fit_s, fit_counts["prompts_fitted"])
    sampling = dict(tiny.sampling)
    rows: list[dict] = []
    if "offline" in modes:
        for label, extra in [("default", []), *variants]:
            over = base + ["llm=tiny", *extra, f"paths.cache_dir={work}/offline-{label}"]
            started = time.perf_counter()
            try:
                backends.make_backend(LLMSettings.from_config(_compose(over).llm)).close()  # loaded once, timed
                load_s = time.perf_counter() - started
                rows.append(_reason("offline", over, load_s, variant=label))
            except Exception as exc:  # noqa: BLE001 - a variant the machine cannot run (memory): the others stand
                log.error("throughput: offline %s failed, left out: %s", label, one_line(exc, 300))
                continue
            finally:
                backends.release_engines()
            log.info("throughput: offline %s: %.3f requests/s", label, rows[-1]["requests_per_s"])
    if "sequential" in modes or "served" in modes:
        with serve.vllm_server(model, work / "serve.log") as srv:
            load_s = srv["load_seconds"]
            if "sequential" in modes:
                rows.append(sequential(srv["base"], str(model), requests, sampling, work / "user_preferences.csv",
                                       load_s))
                log.info("throughput: sequential: %.3f requests/s", rows[-1]["requests_per_s"])
            if "served" in modes:
                for c in concurrency:
                    over = base + ["llm=openai", f"llm.base_url={srv['base']}/v1", f"llm.concurrency={c}",
                                   *(f"llm.sampling.{k}={v}" for k, v in sampling.items()),
                                   f"paths.cache_dir={work}/openai-{c}"]
                    rows.append(_reason("served", over, load_s, concurrency=c))
                    log.info("throughput: served at concurrency %d: %.3f requests/s", c, rows[-1]["requests_per_s"])
    return finish(rows, fit_s, users, data_dir, model)


def finish(rows: list[dict], fit_s: float, users: int, data_dir: Path, model: Path) -> list[dict]:
    """Add the ratio to the sequential run and whether every text equals the first run's; drop the texts."""
    ref = next((r for r in rows if r["mode"] == "sequential"), None)
    first = rows[0]["_texts"] if rows else {}
    for r in rows:
        r["ratio_to_sequential"] = round(r["requests_per_s"] / ref["requests_per_s"], 2) if ref else None
        r["texts_identical"] = r["_texts"] == first
        r["texts_differing"] = sum(first.get(u) != t for u, t in r["_texts"].items()) + len(set(first) - set(r["_texts"]))
        r.update(prompt_fit_seconds=round(fit_s, 2), users=users, dataset=data_dir.name, model=model.name,
                 cpus=os.cpu_count())
    for r in rows:
        r.pop("_texts")
    return rows


def table(rows: list[dict]) -> str:
    head = ("mode", "conc.", "variant", "load s", "requests/s", "prompt tok/s", "gen. tok/s", "x sequential",
            "same texts")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(v if v is not None else "") for v in (
            r["mode"], r["concurrency"], r["variant"], r["engine_load_seconds"], r["requests_per_s"],
            r["prompt_tokens_per_s"], r["generated_tokens_per_s"], r["ratio_to_sequential"], r["texts_identical"]))
            + " |")
    return "\n".join(lines)


def write(rows: list[dict], path: Path) -> None:
    from mllmrec.files import write_text_atomic

    if path.suffix == ".csv":
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows)
        write_text_atomic(path, buf.getvalue())
    else:
        write_text_atomic(path, json.dumps(rows, indent=2) + "\n")


@report_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mllmrec.llm.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=40, help="the first N users with a history")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="served mode: requests in flight")
    p.add_argument("--variant", action="append", default=[], type=str,
                   help="an extra offline run: LABEL:key=value[,key=value]")
    p.add_argument("--data-dir", type=Path, default=REPO / "tests" / "fixtures" / "tiny")
    p.add_argument("--model", type=Path, default=None, help="default: the converted SmolLM2 of llm=tiny")
    p.add_argument("--out", type=Path, default=None, help="write the rows here (JSON, or CSV for *.csv)")
    args = p.parse_args(argv)
    if args.users < 1:
        raise ConfigError("--users", f"must be >= 1, got {args.users}")
    if not (args.data_dir / f"{args.data_dir.name}.inter").is_file():
        raise ConfigError("--data-dir", f"{args.data_dir} holds no {args.data_dir.name}.inter (an MMRec dataset folder)")
    variants = [parse_variant(v) for v in args.variant]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.model is None:
        from mllmrec.llm import convert

        args.model = convert.convert()
    with tempfile.TemporaryDirectory(prefix="mllmrec-throughput-") as tmp:
        rows = measure(args.model.resolve(), args.data_dir.resolve(), args.users, args.modes, args.concurrency,
                       variants, Path(tmp))
    print(table(rows))
    if args.out is not None:
        write(rows, args.out)
        print(f"rows written to {args.out}")


if __name__ == "__main__":
    main()
