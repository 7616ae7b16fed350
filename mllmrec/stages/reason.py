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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from mllmrec.cache import Artifact, ArtifactCache
from mllmrec.data import RecData
from mllmrec.llm import backends, prompts, replay, runner, settings
from mllmrec.llm.settings import LLMSettings
from mllmrec.texts import LEAK_WARNING, item_texts

log = logging.getLogger(__name__)

STAGE = "reason"
OUTPUT = "users.parquet"


def run(rcfg, llm: LLMSettings, data: RecData, cache: ArtifactCache, texts: Sequence[str] | None = None) -> Artifact:
    """``rcfg``: the ``reason`` node (checked here, once); ``llm``: the checked ``llm`` settings;
    ``texts``: the item descriptions D^m_i entering the behaviour lists (default: item text only)."""
    rs = ReasonSettings.from_config(rcfg)
    if rs.history == "all":
        log.warning(LEAK_WARNING)
    if llm.backend == "none":
        return _run_titles(rs, data, cache)
    if llm.backend == "replay":
        log.warning("reason: llm=replay uses the preference texts of %s as they are; reason.history does not "
                    "apply (texts made by the official script include validation/test items)",
                    llm.replay.users_file)
        return replay.artifact(cache, STAGE, data, llm.replay, "user", OUTPUT, "userID")
    try:
        return _run_llm(rs, llm, data, cache, list(texts) if texts is not None else item_texts(data))
    finally:
        backends.release_engines()  # the last LLM stage: free the GPU for encoding and training


@dataclass(frozen=True)
class ReasonSettings:
    """The ``reason`` node, checked once; the defaults are conf/reason/default.yaml's."""

    history: str
    separator: str
    prompt: str
    list_format: str
    max_prompt_tokens: int
    min_item_chars: int
    tokenizer: str | None
    postprocess: str

    @classmethod
    def from_config(cls, node) -> "ReasonSettings":
        r = settings.plain(node)
        return cls(
            history=settings.choice(r.get("history"), "reason.history", ("train", "all")),
            separator=settings.string(r.get("separator"), "reason.separator", empty=True),
            prompt=prompts.check_template(r.get("prompt"), prompts.BEHAVIOUR_SLOT, "reason.prompt"),
            list_format=settings.choice(r.get("list_format"), "reason.list_format", prompts.LIST_FORMATS),
            max_prompt_tokens=settings.integer(r.get("max_prompt_tokens"), "reason.max_prompt_tokens", 16),
            min_item_chars=settings.integer(r.get("min_item_chars"), "reason.min_item_chars", 8),
            tokenizer=settings.string(r.get("tokenizer"), "reason.tokenizer", optional=True),
            postprocess=runner.check_postprocess(r.get("postprocess"), "reason.postprocess"),
        )


def _run_titles(rs: ReasonSettings, data: RecData, cache: ArtifactCache) -> Artifact:
    config = {"backend": "none", "history": rs.history, "separator": rs.separator}

    def build(out):
        titles = data.item_field("title")
        texts = [rs.separator.join(titles[i] for i in items if titles[i]) for items in data.history(rs.history)]
        lengths = np.array([len(t) for t in texts])
        pd.DataFrame(
            {"userID": np.arange(data.n_users), "text": texts, "finish_reason": "none"}
        ).to_parquet(out / OUTPUT, index=False)
        return {"users": data.n_users, "empty_texts": int((lengths == 0).sum()), "mean_chars": float(lengths.mean())}

    return cache.fetch(STAGE, config, {"data": data.fingerprint}, build)


def build_requests(rs: ReasonSettings, model: str | None, data: RecData, texts: Sequence[str],
                   users: Sequence[int] | None = None):
    """Prompt2 for ``users`` (default: every user with a non-empty history), and the truncation
    counts of those prompts. Only these prompts are fitted (``model``'s tokenizer counts the tokens
    of a prompt that may be over ``rs.max_prompt_tokens``)."""
    if len(texts) != data.n_items:
        raise ValueError(f"{len(texts)} item texts for {data.n_items} items")
    histories = data.history(rs.history)
    if users is None:
        users = [u for u, items in enumerate(histories) if len(items)]
    counter = prompts.TokenCounter(rs.tokenizer, model)
    requests, shortened_prompts, shortened_items, dropping_prompts, dropped_items, fitted = [], 0, 0, 0, 0, 0
    for u in users:
        prompt, short, dropped = prompts.fit_behaviour_list(
            [texts[i] for i in histories[u]], rs.prompt, rs.max_prompt_tokens, counter, rs.list_format, rs.separator,
            rs.min_item_chars,
        )
        shortened_prompts += short > 0
        shortened_items += short
        dropping_prompts += dropped > 0
        dropped_items += dropped
        fitted += short > 0 or dropped > 0
        requests.append(backends.Request(int(u), prompt))
    counts = {
        "history": rs.history,
        "users_without_history": int(sum(len(items) == 0 for items in histories)),
        "prompts_with_shortened_items": int(shortened_prompts),
        "items_shortened": int(shortened_items),
        "prompts_with_dropped_items": int(dropping_prompts),
        "items_dropped": int(dropped_items),
        "prompts_fitted": int(fitted),
        "max_prompt_tokens": rs.max_prompt_tokens,
        "token_counter": counter.name if fitted else "not needed",
    }
    if fitted:
        log.warning("reason: %d prompts were over reason.max_prompt_tokens=%d: %d item descriptions shortened, "
                    "%d oldest items dropped from %d prompts", fitted, rs.max_prompt_tokens, shortened_items,
                    dropped_items, dropping_prompts)
    return requests, counts


def _run_llm(rs: ReasonSettings, llm: LLMSettings, data: RecData, cache: ArtifactCache, texts: list[str]) -> Artifact:
    """Select (``llm.limit``, ``llm.shard``) from the users with a history, then fit and tokenize
    only the selected users' prompts: this job's shard, or every chosen one without a shard."""
    candidates = [u for u, items in enumerate(data.history(rs.history)) if len(items)]
    if len(candidates) < data.n_users:
        log.warning("reason: %d users have no %s interaction; they get an empty preference text",
                    data.n_users - len(candidates), "training" if rs.history == "train" else "")
    picked = runner.pick(STAGE, candidates, llm.selection)
    requests, counts = build_requests(rs, llm.model, data, texts, users=picked.mine)
    return runner.generate(
        cache, STAGE, llm, id_column="userID", n_rows=data.n_users, requests=requests, picked=picked,
        prompt=rs.prompt, assembly={"postprocess": rs.postprocess, "history": rs.history}, output=OUTPUT,
        fill_reason="empty_history", counts=counts, desc=f"reason ({llm.backend})",
    )


def load_texts(artifact: Artifact) -> list[str]:
    return runner.read_texts(artifact, OUTPUT, "userID")
