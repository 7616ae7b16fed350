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
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from mllmrec.cache import Artifact, ArtifactCache, stable_hash
from mllmrec.errors import ConfigError
from mllmrec.llm import backends
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
    }


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
        tmp = self.folder / f".{name}.tmp"
        pd.DataFrame(recs, columns=PART_COLUMNS).to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
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
) -> Artifact:
    """Answer ``requests`` (ids in [0, n_rows)) resumably and publish ``output`` with one row per id.

    ``settings`` (backend, model, sampling; see ``llm_job``) and the ``prompt`` template: what the
    answers depend on -> work folder key;
    ``assembly``: how rows are turned into the artifact (post-processing). Rows without a request
    get an empty text and ``finish_reason=fill_reason``.
    """
    settings = {**settings, "prompt": prompt}
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{stage}: duplicate request ids")
    how = assembly.get("postprocess", "strip")
    config = {**dict(settings), **dict(assembly)}
    inputs = {"requests": stable_hash([[r.id, r.input_hash] for r in requests], 32), "rows": str(n_rows)}
    key = cache.key_for(stage, config, inputs)
    if cache.lookup(stage, key) is not None:  # published and sound (a damaged one is rebuilt below)
        return cache.fetch(stage, config, inputs, _never)

    store = WorkStore(cache.work_dir(stage, stable_hash(dict(settings))))
    saved = store.load()
    pending = [r for r in requests if (r.id, r.input_hash) not in saved]
    reused = len(requests) - len(pending)
    if reused:
        log.info("%s: %d of %d answers already saved in %s; %d to generate",
                 stage, reused, len(requests), store.folder, len(pending))
    started = time.perf_counter()
    if pending:
        from tqdm.auto import tqdm

        backend = backend_factory()
        try:
            with tqdm(total=len(requests), initial=reused, unit="rows", desc=desc or stage, smoothing=0.1) as bar:
                for start in range(0, len(pending), chunk):
                    part = pending[start:start + chunk]
                    saved.update(store.save(part, backend.generate(part)))
                    bar.update(len(part))
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
    seconds = time.perf_counter() - started
    by_id = {r.id: saved[(r.id, r.input_hash)] for r in requests}

    def build(out: Path):
        rows = []
        for i in range(n_rows):
            rec = by_id.get(i)
            if rec is None:
                rows.append((i, "", fill_reason, 0, 0))
            else:
                rows.append((i, postprocess(rec["text"], how), rec["finish_reason"],
                             int(rec["prompt_tokens"]), int(rec["completion_tokens"])))
        df = pd.DataFrame(rows, columns=[id_column, *OUTPUT_COLUMNS])
        df.to_parquet(out / output, index=False)
        finish = Counter(df["finish_reason"])
        answered = df[df[id_column].isin(by_id.keys())]
        summary = {
            "rows": n_rows,
            "requests": len(requests),
            "generated_now": len(pending),
            "reused_saved_answers": reused,
            "generation_seconds": round(seconds, 3),
            "rows_per_second": round(len(pending) / seconds, 3) if pending and seconds > 0 else None,
            "empty_texts": int((df["text"] == "").sum()),
            "finish_reasons": dict(sorted((str(k), int(v)) for k, v in finish.items())),
            "truncated_by_max_tokens": int(finish.get("length", 0)),
            "prompt_tokens": int(answered["prompt_tokens"].sum()),
            "completion_tokens": int(answered["completion_tokens"].sum()),
            "mean_completion_tokens": float(answered["completion_tokens"].mean()) if len(answered) else 0.0,
        }
        summary.update(dict(counts or {}))
        return summary

    art = cache.fetch(stage, config, inputs, build)
    c = art.manifest["counts"]
    if c.get("truncated_by_max_tokens"):
        log.warning("%s: %d answers stopped at llm.sampling.max_tokens (finish_reason=length)",
                    stage, c["truncated_by_max_tokens"])
    return art


def _never(out):  # the artifact exists: fetch reuses it
    raise RuntimeError("cached artifact vanished while being reused")
