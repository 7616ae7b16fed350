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
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from mllmrec.cache import Artifact, ArtifactCache, stable_hash
from mllmrec.errors import ConfigError
from mllmrec.files import atomic_file
from mllmrec.llm import backends, prompts
from mllmrec.llm.backends import Request, Result
from mllmrec.llm.progress import HeldSignal, Progress, job_source, progress_file
from mllmrec.llm.progress import eta as eta_text
from mllmrec.llm.settings import LLMSettings, Selection

log = logging.getLogger(__name__)

PART_COLUMNS = ["id", "input_hash", "text", "finish_reason", "prompt_tokens", "completion_tokens", "source"]
OUTPUT_COLUMNS = ["text", "finish_reason", "prompt_tokens", "completion_tokens"]
POSTPROCESS = ("strip", "last_paragraph")


def check_postprocess(how, key: str) -> str:
    if how not in POSTPROCESS:
        raise ConfigError(key, f"must be one of {', '.join(POSTPROCESS)}, got {how!r}")
    return how


class ShardDone(Exception):
    """A shard job (``llm.shard=i``) saved its share of the answers; a run without ``llm.shard``
    merges them. Not an error: the entry points log it and end the job normally."""


@dataclass(frozen=True)
class Picked:
    """What ``llm.limit`` and ``llm.shard`` pick from a stage's candidate request ids, before any
    prompt is built: ``chosen`` (kept by the limit, in request order; the artifact's requests),
    ``over_limit`` (left out by it) and ``mine`` (this job's shard of ``chosen``; all of it
    without ``llm.shard``). A stage builds the requests of ``chosen``, or only those of ``mine``."""

    selection: Selection
    chosen: tuple[int, ...]
    over_limit: frozenset[int]
    mine: tuple[int, ...]


def pick(stage: str, ids: Sequence[int], selection: Selection) -> Picked:
    """Apply ``llm.limit`` (warning about the ids it leaves out) and ``llm.shard`` to the candidate
    ids, in request order; duplicate ids are refused."""
    ids = [int(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{stage}: duplicate request ids")
    chosen = selection.limited(ids)
    over_limit = frozenset(ids) - set(chosen)
    if over_limit:
        log.warning("%s: llm.limit=%d: %d of %d requests (%s); the other %d rows get finish_reason=over_limit",
                    stage, selection.limit, len(chosen), len(ids),
                    "first" if selection.limit_seed is None else f"sample, seed {selection.limit_seed}",
                    len(over_limit))
    return Picked(selection, tuple(chosen), over_limit, tuple(selection.shard_of(chosen)))


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
            if "source" not in df.columns:  # parts saved before the source was recorded
                df["source"] = "an earlier run"
            for rec in df.to_dict("records"):
                rows.setdefault((int(rec["id"]), str(rec["input_hash"])), rec)
        return rows

    def save(self, requests: Sequence[Request], results: Sequence[Result],
             source: str = "") -> dict[tuple[int, str], dict]:
        """One part file with the answers of ``requests``; ``source``: which job made them (the
        merge run's summary counts the answers per source)."""
        if len(results) != len(requests):
            raise RuntimeError(f"{len(results)} answers for {len(requests)} requests")
        recs = []
        for req, res in zip(requests, results):
            if res.id != req.id:
                raise RuntimeError(f"answer for id {res.id} where id {req.id} was expected")
            recs.append({"id": int(req.id), "input_hash": req.input_hash, "text": str(res.text),
                         "finish_reason": str(res.finish_reason), "prompt_tokens": int(res.prompt_tokens),
                         "completion_tokens": int(res.completion_tokens), "source": source})
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
    llm: LLMSettings,
    *,
    id_column: str,
    n_rows: int,
    requests: Sequence[Request],
    picked: Picked,
    prompt: str,
    assembly: Mapping,
    output: str,
    fill_reason: str,
    counts: Mapping | None = None,
    desc: str | None = None,
) -> Artifact:
    """Answer ``requests`` (ids in [0, n_rows)) resumably and publish ``output`` with one row per id.

    ``picked``: what ``llm.limit`` / ``llm.shard`` chose (:func:`pick`); ``requests``: those of
    ``picked.chosen``, or only those of ``picked.mine`` in a shard job. The generation settings of
    ``llm`` (backend, model, sampling) and the ``prompt`` template: what the answers depend on ->
    work folder key; ``assembly``: how rows are turned into the artifact (post-processing). Rows
    without a request get an empty text and ``finish_reason=fill_reason`` (``over_limit`` for rows
    left out by ``llm.limit``). A shard job saves its answers and raises :class:`ShardDone` instead
    of publishing; a run without a shard setting then finds them saved (the merge) and generates
    only what is still missing.
    """
    selection = picked.selection
    settings = {**llm.generation_settings(), "prompt": prompt}
    whole = _built_for_all(stage, requests, picked)
    config = {**dict(settings), **dict(assembly)}
    inputs = {"requests": stable_hash([[r.id, r.input_hash] for r in requests], 32), "rows": str(n_rows)}
    if whole and cache.lookup(stage, cache.key_for(stage, config, inputs)) is not None:  # published and sound
        return cache.fetch(stage, config, inputs, _never)  # (a damaged one is rebuilt below)
    store = WorkStore(cache.work_dir(stage, stable_hash(dict(settings))))
    saved = store.load()
    ids_mine = set(picked.mine)
    mine = [r for r in requests if r.id in ids_mine]
    pending, reused, seconds = _answer_missing(stage, store, saved, requests, mine, llm, settings, desc)
    if selection.shard is not None and picked.chosen:  # a shard job generates only; the next unsharded run merges
        if whole:
            missing = sum((r.id, r.input_hash) not in saved for r in requests)
        else:  # other shards' prompts were not built: their ids without any saved answer, a lower bound
            missing = len(set(picked.chosen) - set(picked.mine) - {i for i, _ in saved})
        raise _shard_done(stage, selection, len(mine), len(pending), missing, exact=whole)
    by_id = {r.id: saved[(r.id, r.input_hash)] for r in requests}
    answers_from = dict(Counter(str(rec.get("source") or "an earlier run") for rec in by_id.values()).most_common())
    summary = {"answers_from": answers_from, "requests": len(requests), "generated_now": len(pending), "reused_saved_answers": reused,
               "generation_seconds": round(seconds, 3),
               "rows_per_second": round(len(pending) / seconds, 3) if pending and seconds > 0 else None,
               "over_limit": len(picked.over_limit), **dict(counts or {})}
    how = assembly.get("postprocess", "strip")

    def build(out: Path):
        return _assemble(out / output, by_id, n_rows, id_column, how, fill_reason, picked.over_limit, summary)

    art = cache.fetch(stage, config, inputs, build)
    _report_published(stage, art, len(by_id), answers_from)
    return art


def _report_published(stage: str, art: Artifact, n_answers: int, answers_from: Mapping) -> None:
    """The merge run's summary: where the published answers came from; and any cut at max_tokens."""
    if not art.reused:
        log.info("%s: published %s; its %d answers came from: %s", stage, art.path, n_answers,
                 "; ".join(f"{n} from {who}" for who, n in answers_from.items()) or "nowhere")
    truncated = art.manifest["counts"].get("truncated_by_max_tokens")
    if truncated:
        log.warning("%s: %d answers stopped at llm.sampling.max_tokens (finish_reason=length)", stage, truncated)


def _built_for_all(stage: str, requests: Sequence[Request], picked: Picked) -> bool:
    """True when ``requests`` are those of every chosen id (publishing needs them all), False when
    they are only this shard's (a shard job that built no other prompt)."""
    ids = tuple(r.id for r in requests)
    if ids == picked.chosen:
        return True
    if picked.selection.shard is not None and ids == picked.mine:
        return False
    raise RuntimeError(f"{stage}: the requests built are not the ones llm.limit / llm.shard picked")


def _answer_missing(stage: str, store: WorkStore, saved: dict, requests: Sequence[Request], mine: Sequence[Request],
                    llm: LLMSettings, settings: Mapping, desc: str | None):
    """Answer this job's requests (``mine``: its shard) that have no saved answer, adding them to
    ``saved``. Returns (the requests answered now, answers of ``requests`` reused, seconds spent)."""
    pending = [r for r in mine if (r.id, r.input_hash) not in saved]
    reused = len(requests) - len([r for r in requests if (r.id, r.input_hash) not in saved])
    if reused:
        log.info("%s: %d of %d answers already saved in %s; %d to generate",
                 stage, reused, len(requests), store.folder, len(pending))
    started = time.perf_counter()
    if pending:
        announce(stage, pending, settings, lambda: prompts.TokenCounter("auto", llm.model), llm.selection)
        _answer(stage, store, saved, pending, lambda: backends.make_backend(llm), llm.chunk_size, desc,
                done=len(mine) - len(pending), selection=llm.selection)
    return pending, reused, time.perf_counter() - started


def _shard_done(stage: str, selection: Selection, mine: int, generated: int, missing: int, exact: bool) -> ShardDone:
    """``missing``: chosen requests of other shards without an answer; a lower bound unless
    ``exact`` (a shard job that built only its own prompts knows only the ids with no answer at all)."""
    status = (f"{'' if exact else 'at least '}{missing} requests of other shards are not answered yet: " if missing
              else "every shard is answered: " if exact else "")
    return ShardDone(f"{stage}: shard {selection.shard} of {selection.num_shards} is done ({mine} requests, "
                     f"{generated} generated now); {status}run without llm.shard to merge them into the artifact")


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


def _answer(stage, store: WorkStore, saved: dict, pending: Sequence[Request], backend_factory, chunk: int,
            desc: str | None, done: int, selection: Selection = Selection()) -> None:
    """Generate ``pending`` chunk by chunk, saving each chunk. One log line per chunk: requests
    done / total (this job's), requests/s and generated tokens/s so far, and the estimated time
    left; the bar shows the same. A SIGUSR2 during a chunk is held until it is saved (HeldSignal)."""
    from tqdm.auto import tqdm

    total = done + len(pending)
    source = job_source(selection)
    where = f" (shard {selection.shard} of {selection.num_shards})" if selection.shard is not None else ""
    progress = Progress(progress_file(stage), stage, selection, total, chunk, source)
    progress.update(saved=done, state="loading the engine")
    with HeldSignal() as held:
        with held.shielding_children():
            backend = backend_factory()
        try:
            with tqdm(total=total, initial=done, unit="rows", desc=desc or stage, smoothing=0.1) as bar:
                t0 = time.perf_counter()
                tokens = 0
                for start in range(0, len(pending), chunk):
                    part = pending[start:start + chunk]
                    progress.update(state="generating", chunk_started_at=round(time.time(), 1),
                                    chunk_requests=len(part))
                    results = backend.generate(part)
                    saved.update(store.save(part, results, source))
                    n = start + len(part)
                    tokens += sum(int(r.completion_tokens) for r in results)
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    eta = eta_text((len(pending) - n) / (n / elapsed))
                    progress.update(saved=done + n, state="done" if n == len(pending) else "saved a chunk")
                    bar.update(len(part))
                    bar.set_postfix_str(f"eta {eta}", refresh=True)
                    log.info("%s%s: %d/%d requests done (%.0f%%), %.2f requests/s, %.1f generated tokens/s, "
                             "ETA %s", stage, where, done + n, total, 100 * (done + n) / total, n / elapsed,
                             tokens / elapsed, eta)
                    if held.received is not None and n < len(pending):
                        held.hand_over(stage, done + n, total)
                if held.received is not None:
                    log.info("%s: SIGUSR2 came during the last chunk; every answer is saved, the job ends normally",
                             stage)
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
