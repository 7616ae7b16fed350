"""The ``llm`` settings, checked once where the config enters (:meth:`LLMSettings.from_config`, called
by :func:`mllmrec.pipeline.build_inputs`) and handed down as one frozen object: the stages, the
runner and the backends read its attributes, never the config node.

The defaults live in the presets (``conf/llm/<backend>.yaml``), not here: a key a backend needs
that the node lacks (a hand-written preset, say) is a one-line error naming it, like a value out
of range; a key the backend does not read is refused too (a misspelt one would be ignored).
The checks (:func:`integer`, :func:`choice`, ...) serve the reason stage's settings as well.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from mllmrec.errors import ConfigError

BACKENDS = ("none", "replay", "vllm", "openai")
GENERATIVE = ("vllm", "openai")
_SELECTION = ("limit", "limit_seed", "num_shards", "shard")
_GENERATION = ("model", "chunk_size", "sampling", *_SELECTION)
KEYS = {  # what each backend reads, besides ``backend``
    "none": (),
    "replay": ("items_file", "item_id_column", "item_text_column", "users_file", "user_id_column", "user_text_column"),
    "vllm": (*_GENERATION, "engine", "engine_extra", "engine_factory"),
    "openai": (*_GENERATION, "base_url", "api_key_env", "concurrency", "timeout", "max_retries", "backoff"),
}


# ---------------------------------------------------------------- checks
def plain(node) -> dict:
    """A config node as a plain dict, interpolations resolved (None: empty)."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def integer(value, key: str, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, f"must be {'null or ' if optional else ''}an integer >= {minimum}, got {value!r}")
    return value


def number(value, key: str, minimum: float, *, strict: bool = False) -> float:
    """A number >= ``minimum`` (> with ``strict``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < minimum or (strict and value == minimum):
        raise ConfigError(key, f"must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def string(value, key: str, *, optional: bool = False, empty: bool = False) -> str | None:
    """A string (non-empty unless ``empty``); None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not value and not empty):
        raise ConfigError(key, f"must be {'null or ' if optional else ''}a{'' if empty else ' non-empty'} string, "
                               f"got {value!r}")
    return value


def choice(value, key: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ConfigError(key, f"must be one of {', '.join(options)}, got {value!r}")
    return value


def mapping(value, key: str) -> dict:
    """A mapping (null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {value!r}")
    return dict(value)


# ---------------------------------------------------------------- the pieces
@dataclass(frozen=True)
class Selection:
    """Which requests a run answers: ``llm.limit`` (the first N, or a sample of N drawn with
    ``llm.limit_seed``) and then ``llm.shard`` of ``llm.num_shards`` (requests whose position
    modulo num_shards is the shard). Works on any sequence (requests, or their ids)."""

    limit: int | None = None
    limit_seed: int | None = None
    num_shards: int = 1
    shard: int | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> "Selection":
        limit = integer(cfg.get("limit"), "llm.limit", 1, optional=True)
        limit_seed = integer(cfg.get("limit_seed"), "llm.limit_seed", 0, optional=True)
        num_shards = integer(cfg.get("num_shards"), "llm.num_shards", 1, optional=True) or 1
        shard = integer(cfg.get("shard"), "llm.shard", 0, optional=True)
        if shard is not None and shard >= num_shards:
            raise ConfigError("llm.shard", f"must be in 0..{num_shards - 1} (llm.num_shards={num_shards}), got {shard}")
        if shard is not None and num_shards == 1:
            raise ConfigError("llm.shard", "set llm.num_shards (> 1) as well")
        return cls(limit, limit_seed, num_shards, shard)

    def limited(self, requests: Sequence) -> list:
        if self.limit is None or self.limit >= len(requests):
            return list(requests)
        if self.limit_seed is None:
            return list(requests[:self.limit])
        pick = sorted(random.Random(self.limit_seed).sample(range(len(requests)), self.limit))
        return [requests[i] for i in pick]

    def shard_of(self, requests: Sequence) -> list:
        if self.shard is None:
            return list(requests)
        return [r for n, r in enumerate(requests) if n % self.num_shards == self.shard]


@dataclass(frozen=True)
class VLLMOptions:
    """``vllm.LLM(model=..., **engine, **engine_extra)``; ``engine_factory`` replaces ``vllm.LLM``."""

    engine: dict
    engine_extra: dict
    engine_factory: str | None

    @classmethod
    def from_config(cls, cfg: dict) -> "VLLMOptions":
        return cls(mapping(cfg.get("engine"), "llm.engine"), mapping(cfg.get("engine_extra"), "llm.engine_extra"),
                   string(cfg.get("engine_factory"), "llm.engine_factory", optional=True))


@dataclass(frozen=True)
class OpenAIOptions:
    """The OpenAI-compatible client: where, with which key variable, how many in flight, retries."""

    base_url: str
    api_key_env: str
    concurrency: int
    timeout: float
    max_retries: int
    backoff_initial: float
    backoff_max: float

    @classmethod
    def from_config(cls, cfg: dict) -> "OpenAIOptions":
        base = str(cfg.get("base_url") or "").rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ConfigError("llm.base_url", f"must be an http(s) URL such as http://localhost:8000/v1, got {base!r}")
        backoff = mapping(cfg.get("backoff"), "llm.backoff")
        return cls(base, string(cfg.get("api_key_env"), "llm.api_key_env"),
                   integer(cfg.get("concurrency"), "llm.concurrency", 1),
                   number(cfg.get("timeout"), "llm.timeout", 0, strict=True),
                   integer(cfg.get("max_retries"), "llm.max_retries", 0),
                   number(backoff.get("initial"), "llm.backoff.initial", 0),
                   number(backoff.get("max"), "llm.backoff.max", 0))


@dataclass(frozen=True)
class ReplayFiles:
    """``llm=replay``: the files of texts made elsewhere and their columns (null text column: guessed)."""

    items_file: str | None
    item_id_column: str
    item_text_column: str | None
    users_file: str | None
    user_id_column: str
    user_text_column: str | None

    @classmethod
    def from_config(cls, cfg: dict) -> "ReplayFiles":
        values = {k: string(cfg.get(k), f"llm.{k}", optional=not k.endswith("_id_column")) for k in KEYS["replay"]}
        return cls(**values)


# ---------------------------------------------------------------- the whole node
@dataclass(frozen=True)
class LLMSettings:
    """The checked ``llm`` node. ``sampling``: the options that are not null. Fields a backend does
    not read stay None (``vllm``/``openai``/``replay``: the options of that backend only)."""

    backend: str
    model: str | None = None
    chunk_size: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    selection: Selection = Selection()
    vllm: VLLMOptions | None = None
    openai: OpenAIOptions | None = None
    replay: ReplayFiles | None = None

    @classmethod
    def from_config(cls, node) -> "LLMSettings":
        cfg = plain(node)
        backend = cfg.get("backend")
        if backend not in BACKENDS:
            raise ConfigError("llm.backend", f"unknown backend {backend!r} ({', '.join(BACKENDS)})")
        unknown = sorted(set(cfg) - {"backend", *KEYS[backend]})
        if unknown:
            raise ConfigError(f"llm.{unknown[0]}", f"not a setting of llm.backend={backend} "
                                                   f"(its settings: {', '.join(KEYS[backend]) or 'none'})")
        if backend == "replay":
            return cls(backend, replay=ReplayFiles.from_config(cfg))
        if backend not in GENERATIVE:
            return cls(backend)
        model = cfg.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError("llm.model", f"name the model (a folder, or the name the server knows), got {model!r}")
        sampling = mapping(cfg.get("sampling"), "llm.sampling")
        return cls(backend, model, integer(cfg.get("chunk_size"), "llm.chunk_size", 1),
                   {k: v for k, v in sampling.items() if v is not None}, Selection.from_config(cfg),
                   vllm=VLLMOptions.from_config(cfg) if backend == "vllm" else None,
                   openai=OpenAIOptions.from_config(cfg) if backend == "openai" else None)

    @property
    def generative(self) -> bool:
        return self.backend in GENERATIVE

    def generation_settings(self) -> dict:
        """What an answer depends on (part of every cache key); never the API key variable or the URL."""
        return {"backend": self.backend, "model": self.model, "sampling": dict(self.sampling)}
