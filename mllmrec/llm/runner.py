"""Resumable, chunked generation published as one cached artifact.

Requests are answered in chunks (``llm.chunk_size`` at once: vLLM schedules a whole chunk, the
OpenAI backend runs it with ``llm.concurrency`` requests in flight). Each finished chunk is saved
as one parquet part file in the work folder ``<cache_dir>/<dataset>/<stage>/.work-<key>/``
(written to a temporary name and renamed, so a part is either complete or absent), where ``key``
is the hash of the generation settings (backend, model, sampling, prompt template). Every saved
row carries the hash of its request (prompt text and image), so a rerun after a crash or
``kill -9`` sends only the requests whose answer is not saved yet, and a changed prompt for some
rows regenerates only those rows. Once every request is answered, the artifact (one row per
item/user) is assembled and published atomically through :meth:`ArtifactCache.fetch`.

The work folder is kept after publishing as a response store for these settings (later runs
whose inputs changed only in part reuse the answers it holds); deleting it is always safe.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from mllmrec.cache import Artifact, ArtifactCache, stable_hash
from mllmrec.errors import ConfigError
from mllmrec.files import atomic_file
from mllmrec.llm import backends, prompts
from mllmrec.llm.backends import Request, Result

log = logging.getLogger(__name__)

PART_COLUMNS = ["id", "input_hash", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
OUTPUT_COLUMNS = ["text", "finish_reason", "prompt_tokens", "completion_tokens"]
POSTPROCESS = ("strip", "last_paragraph")


def llm_job(llm_cfg, postprocess: str, postprocess_key: str) -> dict:
    """The ``generate`` arguments that come from the LLM settings, checked before any work is done:
    the settings the answers depend on (backend, model, sampling), the backend factory and the
    chunk size."""
    if postprocess not in POSTPROCESS:
        raise ConfigError(postprocess_key, f"must be one of {', '.join(POSTPROCESS)}, got {postprocess!r}")
    return {
        "settings": backends.generation_settings(llm_cfg),
        "backend_factory": lambda: backends.make_backend(llm_cfg),
        "chunk": backends.chunk_size(llm_cfg),
        "selection": Selection.from_config(llm_cfg),
        "counter": lambda: prompts.TokenCounter("auto", llm_cfg.get("model")),
    }


class ShardDone(Exception):
    """A shard job (``llm.shard=i``) saved its share of the answers; a run without ``llm.shard``
    merges them. Not an error: the entry points log it and end the job normally."""


def _optional_int(llm_cfg, key: str, minimum: int) -> int | None:
    value = llm_cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"llm.{key}", f"must be null or an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Selection:
    """Which requests a run answers: ``llm.limit`` (the first N, or a sample of N drawn with
    ``llm.limit_seed``) and then ``llm.shard`` of ``llm.num_shards`` (requests whose position
    modulo num_shards is the shard)."""

    limit: int | None = None
    limit_seed: int | None = None
    num_shards: int = 1
    shard: int | None = None

    @classmethod
    def from_config(cls, llm_cfg) -> "Selection":
        limit = _optional_int(llm_cfg, "limit", 1)
        limit_seed = _optional_int(llm_cfg, "limit_seed", 0)
        num_shards = _optional_int(llm_cfg, "num_shards", 1) or 1
        shard = _optional_int(llm_cfg, "shard", 0)
        if shard is not None and shard >= num_shards:
            raise ConfigError("llm.shard", f"must be in 0..{num_shards - 1} (llm.num_shards={num_shards}), got {shard}")
        if shard is not None and num_shards == 1:
            raise ConfigError("llm.shard", "set llm.num_shards (> 1) as well")
        return cls(limit, limit_seed, num_shards, shard)

    def limited(self, requests: Sequence[Request]) -> list[Request]:
        if self.limit is None or self.limit >= len(requests):
            return list(requests)
        if self.limit_seed is None:
            return list(requests[:self.limit])
        pick = sorted(random.Random(self.limit_seed).sample(range(len(requests)), self.limit))
        return [requests[i] for i in pick]

    def shard_of(self, requests: Sequence[Request]) -> list[Request]:
        if self.shard is None:
            return list(requests)
        return [r for n, r in enumerate(requests) if n % self.num_shards == self.shard]


class WorkStore:
    """Saved answers of one generation setting: ``part-*.parquet`` files, one per finished chunk."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self) -> dict[tuple[int, str], dict]:
        rows: dict[tuple[int, str], dict] = {}
        if not self.folder.is_dir():
            return rows
        for part in sorted(self.folder.glob("part-*.parquet")):
            try:
                df = pd.read_parquet(part)
            except Exception as exc:  # noqa: BLE001 - a damaged part is skipped, its rows regenerated
                log.warning("%s: unreadable (%s); its requests will be sent again", part, exc)
                continue
            for rec in df.to_dict("records"):
                rows.setdefault((int(rec["id"]), str(rec["input_hash"])), rec)
        return rows

    def save(self, requests: Sequence[Request], results: Sequence[Result]) -> dict[tuple[int, str], dict]:
        if len(results) != len(requests):
            raise RuntimeError(f"{len(results)} answers for {len(requests)} requests")
        recs = []
        for req, res in zip(requests, results):
            if res.id != req.id:
                raise RuntimeError(f"answer for id {res.id} where id {req.id} was expected")
            recs.append({"id": int(req.id), "input_hash": req.input_hash, "text": str(res.text),
                         "finish_reason": str(res.finish_reason), "prompt_tokens": int(res.prompt_tokens),
                         "completion_tokens": int(res.completion_tokens)})
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_file(self.folder / name, fsync=True) as tmp:  # hidden until renamed: not a part-* yet
            pd.DataFrame(recs, columns=PART_COLUMNS).to_parquet(tmp, index=False)
        return {(r["id"], r["input_hash"]): r for r in recs}


def read_texts(artifact: Artifact, output: str, id_column: str) -> list[str]:
    """The ``text`` column of a stage's parquet output, in id order (missing text -> "")."""
    df = pd.read_parquet(artifact.file(output))
    return df.sort_values(id_column)["text"].fillna("").tolist()


def postprocess(text: str, how: str) -> str:
    """``strip``: trim whitespace; ``last_paragraph``: the last non-empty paragraph (what the
    official image-description script keeps: it drops a preface such as "Here is a description:")."""
    text = (text or "").strip()
    if how == "last_paragraph":
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n|\n", text) if p.strip()]
        return paragraphs[-1] if paragraphs else ""
    return text


def generate(
    cache: ArtifactCache,
    stage: str,
    *,
    id_column: str,
    n_rows: int,
    requests: Sequence[Request],
    prompt: str,
    settings: Mapping,
    assembly: Mapping,
    output: str,
    backend_factory: Callable[[], object],
    chunk: int,
    fill_reason: str,
    counts: Mapping | None = None,
    desc: str | None = None,
    selection: Selection | None = None,
    counter: Callable[[], object] | None = None,
) -> Artifact:
    """Answer ``requests`` (ids in [0, n_rows)) resumably and publish ``output`` with one row per id.

    ``settings`` (backend, model, sampling; see ``llm_job``) and the ``prompt`` template: what the
    answers depend on -> work folder key; ``assembly``: how rows are turned into the artifact
    (post-processing). Rows without a request get an empty text and ``finish_reason=fill_reason``
    (``over_limit`` for rows left out by ``llm.limit``). ``selection``: ``llm.limit`` and the
    shard; a shard job (``llm.shard`` set) saves its answers and raises :class:`ShardDone` instead
    of publishing; a run without a shard setting then finds them saved (the merge) and generates
    only what is still missing.
    """
    selection = selection or Selection()
    settings = {**settings, "prompt": prompt}
    requests, over_limit = _limited(stage, requests, selection)
    config = {**dict(settings), **dict(assembly)}
    inputs = {"requests": stable_hash([[r.id, r.input_hash] for r in requests], 32), "rows": str(n_rows)}
    if cache.lookup(stage, cache.key_for(stage, config, inputs)) is not None:  # published and sound
        return cache.fetch(stage, config, inputs, _never)  # (a damaged one is rebuilt below)
    store = WorkStore(cache.work_dir(stage, stable_hash(dict(settings))))
    saved = store.load()
    mine, pending, reused, seconds = _answer_missing(
        stage, store, saved, requests, selection, settings, counter=counter, backend_factory=backend_factory,
        chunk=chunk, desc=desc)
    if selection.shard is not None and requests:  # a shard job generates only; the next unsharded run merges
        missing = sum((r.id, r.input_hash) not in saved for r in requests)
        raise _shard_done(stage, selection, mine, len(pending), missing)
    by_id = {r.id: saved[(r.id, r.input_hash)] for r in requests}
    summary = {"requests": len(requests), "generated_now": len(pending), "reused_saved_answers": reused,
               "generation_seconds": round(seconds, 3),
               "rows_per_second": round(len(pending) / seconds, 3) if pending and seconds > 0 else None,
               "over_limit": len(over_limit), **dict(counts or {})}
    how = assembly.get("postprocess", "strip")

    def build(out: Path):
        return _assemble(out / output, by_id, n_rows, id_column, how, fill_reason, over_limit, summary)

    art = cache.fetch(stage, config, inputs, build)
    truncated = art.manifest["counts"].get("truncated_by_max_tokens")
    if truncated:
        log.warning("%s: %d answers stopped at llm.sampling.max_tokens (finish_reason=length)", stage, truncated)
    return art


def _limited(stage: str, requests: Sequence[Request], selection: Selection) -> tuple[list[Request], set]:
    """The requests ``llm.limit`` keeps, and the ids it leaves out (warned); duplicate ids are refused."""
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{stage}: duplicate request ids")
    chosen = selection.limited(requests)
    over_limit = set(ids) - {r.id for r in chosen}
    if over_limit:
        log.warning("%s: llm.limit=%d: %d of %d requests (%s); the other %d rows get finish_reason=over_limit",
                    stage, selection.limit, len(chosen), len(requests),
                    "first" if selection.limit_seed is None else f"sample, seed {selection.limit_seed}",
                    len(over_limit))
    return chosen, over_limit


def _answer_missing(stage: str, store: WorkStore, saved: dict, requests: Sequence[Request], selection: Selection,
                    settings: Mapping, *, counter, backend_factory, chunk: int, desc: str | None):
    """Answer this job's requests (its shard) that have no saved answer, adding them to ``saved``.

    Returns (requests of this job, the requests answered now, answers reused, seconds spent)."""
    mine = selection.shard_of(requests)
    pending = [r for r in mine if (r.id, r.input_hash) not in saved]
    reused = len(requests) - len([r for r in requests if (r.id, r.input_hash) not in saved])
    if reused:
        log.info("%s: %d of %d answers already saved in %s; %d to generate",
                 stage, reused, len(requests), store.folder, len(pending))
    started = time.perf_counter()
    if pending:
        announce(stage, pending, settings, counter, selection)
        _answer(stage, store, saved, pending, backend_factory, chunk, desc, done=len(mine) - len(pending))
    return len(mine), pending, reused, time.perf_counter() - started


def _shard_done(stage: str, selection: Selection, mine: int, generated: int, missing: int) -> ShardDone:
    return ShardDone(f"{stage}: shard {selection.shard} of {selection.num_shards} is done ({mine} requests, "
                     f"{generated} generated now); " + (
                         f"{missing} requests of other shards are not answered yet" if missing else
                         "every shard is answered") + ": run without llm.shard to merge them into the artifact")


def announce(stage: str, pending: Sequence[Request], settings: Mapping, counter, selection: Selection) -> None:
    """One line before generating: requests, prompt tokens, and the most tokens the answers can take."""
    tokens, how = None, "not counted"
    if counter is not None:
        tc = counter()
        tokens = sum(tc.count(r.text) for r in pending)
        how = f"{tc.name} tokenizer" if tc.tokenizer is not None else "~4 chars/token"
    images = sum(r.image is not None for r in pending)
    max_tokens = (settings.get("sampling") or {}).get("max_tokens")
    where = f" (shard {selection.shard} of {selection.num_shards})" if selection.shard is not None else ""
    log.info("%s: %d requests to generate%s, %s prompt tokens (%s%s)%s", stage, len(pending), where,
             "?" if tokens is None else f"{tokens:,}", how, f"; text only, plus {images} images" if images else "",
             f", at most {max_tokens * len(pending):,} new tokens (max_tokens={max_tokens})" if max_tokens else "")


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _answer(stage, store: WorkStore, saved: dict, pending: Sequence[Request], backend_factory, chunk: int,
            desc: str | None, done: int) -> None:
    """Generate ``pending`` chunk by chunk, saving each chunk; the bar's ETA (and one log line) come
    from the throughput of the chunks answered so far, the first one included."""
    from tqdm.auto import tqdm

    backend = backend_factory()
    try:
        with tqdm(total=done + len(pending), initial=done, unit="rows", desc=desc or stage, smoothing=0.1) as bar:
            t0 = time.perf_counter()
            for start in range(0, len(pending), chunk):
                part = pending[start:start + chunk]
                saved.update(store.save(part, backend.generate(part)))
                bar.update(len(part))
                n = start + len(part)
                rate = n / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"eta {_eta((len(pending) - n) / rate)}", refresh=True)
                if start == 0:
                    log.info("%s: first chunk of %d in %.1f s (%.2f requests/s); ETA for the other %d: %s", stage,
                             len(part), time.perf_counter() - t0, rate, len(pending) - n, _eta((len(pending) - n) / rate))
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()


def _assemble(path: Path, by_id: dict, n_rows: int, id_column: str, how: str, fill_reason: str,
              over_limit: set, summary: dict) -> dict:
    rows = []
    for i in range(n_rows):
        rec = by_id.get(i)
        if rec is None:
            rows.append((i, "", "over_limit" if i in over_limit else fill_reason, 0, 0))
        else:
            rows.append((i, postprocess(rec["text"], how), rec["finish_reason"],
                         int(rec["prompt_tokens"]), int(rec["completion_tokens"])))
    df = pd.DataFrame(rows, columns=[id_column, *OUTPUT_COLUMNS])
    df.to_parquet(path, index=False)
    finish = Counter(df["finish_reason"])
    answered = df[df[id_column].isin(by_id.keys())]
    return {
        "rows": n_rows,
        **summary,
        "empty_texts": int((df["text"] == "").sum()),
        "finish_reasons": dict(sorted((str(k), int(v)) for k, v in finish.items())),
        "truncated_by_max_tokens": int(finish.get("length", 0)),
        "prompt_tokens": int(answered["prompt_tokens"].sum()),
        "completion_tokens": int(answered["completion_tokens"].sum()),
        "mean_completion_tokens": float(answered["completion_tokens"].mean()) if len(answered) else 0.0,
    }


def _never(out):  # the artifact exists: fetch reuses it
    raise RuntimeError("cached artifact vanished while being reused")
