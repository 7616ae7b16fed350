"""Reason stage (SPEC steps 3-4): one preference text per user -> ``users.parquet``
(userID, text, finish_reason, and for generated texts prompt_tokens, completion_tokens).

Backends (``llm`` config group):
- ``none``: the user's behaviour list itself (item titles of the history joined with
  ``reason.separator``) is the preference text;
- ``vllm`` / ``openai``: ``D^p_u = MLLM(Prompt2, List_u)`` where ``List_u`` holds the multimodal
  descriptions ``D^m_i`` (item text + image description) of the user's items, oldest first, fitted
  into ``reason.max_prompt_tokens`` (descriptions shortened first, then the oldest items dropped);
  generated resumably in chunks (:mod:`mllmrec.llm.runner`);
- ``replay``: the texts of ``llm.users_file``.

``reason.history=train`` (default) builds ``List_u`` from TRAINING interactions only;
``reason.history=all`` is the paper's protocol and logs that validation/test items leak.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from mllmrec.cache import Artifact, ArtifactCache
from mllmrec.data import RecData
from mllmrec.errors import ConfigError
from mllmrec.llm import backends, prompts, replay, runner
from mllmrec.texts import LEAK_WARNING, item_texts

log = logging.getLogger(__name__)

STAGE = "reason"
OUTPUT = "users.parquet"


def run(rcfg, llm, data: RecData, cache: ArtifactCache, texts: Sequence[str] | None = None) -> Artifact:
    """``rcfg``: the ``reason`` node; ``llm``: the ``llm`` node; ``texts``: the item descriptions
    D^m_i entering the behaviour lists (default: item text only)."""
    backend = llm.backend
    history = rcfg.history
    if history not in ("train", "all"):
        raise ConfigError("reason.history", f"must be 'train' or 'all', got {history!r}")
    if history == "all":
        log.warning(LEAK_WARNING)
    if backend == "none":
        return _run_titles(rcfg, data, cache, history)
    if backend == "replay":
        log.warning("reason: llm=replay uses the preference texts of %s as they are; reason.history does not "
                    "apply (texts made by the official script include validation/test items)",
                    llm.get("users_file"))
        return replay.artifact(cache, STAGE, data, llm, "user", OUTPUT, "userID")
    if backend not in backends.GENERATIVE:
        raise ConfigError("llm.backend", f"unknown backend {backend!r} (none, replay, vllm, openai)")
    try:
        return _run_llm(rcfg, llm, data, cache, history, list(texts) if texts is not None else item_texts(data))
    finally:
        backends.release_engines()  # the last LLM stage: free the GPU for encoding and training


def _run_titles(rcfg, data: RecData, cache: ArtifactCache, history: str) -> Artifact:
    config = {"backend": "none", "history": history, "separator": rcfg.separator}

    def build(out):
        titles = data.item_field("title")
        sep = rcfg.separator
        texts = [sep.join(titles[i] for i in items if titles[i]) for items in data.history(history)]
        lengths = np.array([len(t) for t in texts])
        pd.DataFrame(
            {"userID": np.arange(data.n_users), "text": texts, "finish_reason": "none"}
        ).to_parquet(out / OUTPUT, index=False)
        return {"users": data.n_users, "empty_texts": int((lengths == 0).sum()), "mean_chars": float(lengths.mean())}

    return cache.fetch(STAGE, config, {"data": data.fingerprint}, build)


def _int_setting(rcfg, key: str, default: int, minimum: int) -> int:
    value = rcfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"reason.{key}", f"must be an integer >= {minimum}, got {value!r}")
    return value


def build_requests(rcfg, llm, data: RecData, texts: Sequence[str], history: str):
    """Prompt2 per user with a non-empty history, and the truncation counts (``rcfg``: the
    ``reason`` node; ``llm``: the ``llm`` node, whose model's tokenizer counts the tokens)."""
    if len(texts) != data.n_items:
        raise ValueError(f"{len(texts)} item texts for {data.n_items} items")
    template = prompts.check_template(rcfg.get("prompt"), prompts.BEHAVIOUR_SLOT, "reason.prompt")
    style = rcfg.get("list_format", "python")
    if style not in prompts.LIST_FORMATS:
        raise ConfigError("reason.list_format", f"must be one of {', '.join(prompts.LIST_FORMATS)}, got {style!r}")
    limit = _int_setting(rcfg, "max_prompt_tokens", 4096, 16)
    min_chars = _int_setting(rcfg, "min_item_chars", 200, 8)
    separator = rcfg.get("separator", "; ")
    counter = prompts.TokenCounter(rcfg.get("tokenizer", "auto"), llm.get("model"))
    requests, shortened_prompts, shortened_items, dropping_prompts, dropped_items, fitted = [], 0, 0, 0, 0, 0
    for u, items in enumerate(data.history(history)):
        if len(items) == 0:
            continue
        prompt, short, dropped = prompts.fit_behaviour_list(
            [texts[i] for i in items], template, limit, counter, style, separator, min_chars
        )
        shortened_prompts += short > 0
        shortened_items += short
        dropping_prompts += dropped > 0
        dropped_items += dropped
        fitted += short > 0 or dropped > 0
        requests.append(backends.Request(int(u), prompt))
    counts = {
        "history": history,
        "users_without_history": data.n_users - len(requests),
        "prompts_with_shortened_items": int(shortened_prompts),
        "items_shortened": int(shortened_items),
        "prompts_with_dropped_items": int(dropping_prompts),
        "items_dropped": int(dropped_items),
        "prompts_fitted": int(fitted),
        "max_prompt_tokens": limit,
        "token_counter": counter.name if fitted else "not needed",
    }
    if fitted:
        log.warning("reason: %d prompts were over reason.max_prompt_tokens=%d: %d item descriptions shortened, "
                    "%d oldest items dropped from %d prompts", fitted, limit, shortened_items, dropped_items,
                    dropping_prompts)
    return requests, template, counts


def _run_llm(rcfg, llm, data: RecData, cache: ArtifactCache, history: str, texts: list[str]) -> Artifact:
    postprocess = rcfg.get("postprocess", "strip")
    job = runner.llm_job(llm, postprocess, "reason.postprocess")
    requests, template, counts = build_requests(rcfg, llm, data, texts, history)
    if counts["users_without_history"]:
        log.warning("reason: %d users have no %s interaction; they get an empty preference text",
                    counts["users_without_history"], "training" if history == "train" else "")
    return runner.generate(
        cache, STAGE, id_column="userID", n_rows=data.n_users, requests=requests, prompt=template,
        assembly={"postprocess": postprocess, "history": history}, output=OUTPUT, fill_reason="empty_history",
        counts=counts, desc=f"reason ({llm.backend})", **job,
    )


def load_texts(artifact: Artifact) -> list[str]:
    return runner.read_texts(artifact, OUTPUT, "userID")
