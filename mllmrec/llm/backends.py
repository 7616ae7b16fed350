"""LLM backends: ``vllm`` (offline batch inference) and ``openai`` (any OpenAI-compatible server).

Both take a list of :class:`Request` (one user turn: text plus an optional image) and return one
:class:`Result` per request, in order. ``llm=none`` and ``llm=replay`` need no backend.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from mllmrec.cache import stable_hash
from mllmrec.errors import ConfigError, MLLMRecError
from mllmrec.llm import engine as vllm_engine
from mllmrec.llm.images import data_url
from mllmrec.llm.settings import GENERATIVE, LLMSettings

log = logging.getLogger(__name__)

VLLM_MISSING = (
    "backend 'vllm' needs the vllm package, which is not importable here ({reason}): "
    "pip install 'mllmrec[vllm]' (or pip install vllm) on a CUDA machine, "
    "`make install-llm` for the CPU build in .venv-llm, or serve the model and use llm=openai"
)

# Tests (and custom engines) may replace vllm.LLM: a callable taking LLM's keyword arguments.
ENGINE_FACTORY: Callable[..., Any] | None = None
# Loaded vLLM engines, shared by the describe and reason stages of one process (loading a 27B
# model takes minutes); the reason stage releases them when it is done (release_engines).
_ENGINES: dict[str, Any] = {}


def release_engines() -> None:
    """Drop the loaded vLLM engines and give their GPU memory back (before encoding and training)."""
    if not _ENGINES:
        return
    _ENGINES.clear()
    import gc

    gc.collect()
    torch = sys.modules.get("torch")  # imported by vLLM; not worth importing otherwise
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("vllm: engine released")


@dataclass
class Request:
    id: int
    text: str
    image: Path | None = None
    image_hash: str = ""

    @property
    def input_hash(self) -> str:
        """What the answer depends on besides the generation settings: the prompt and the image."""
        return stable_hash([self.text, self.image_hash], 24)

    def messages(self) -> list[dict]:
        """One OpenAI-style user turn (image part first, then the prompt text)."""
        if self.image is None:
            return [{"role": "user", "content": self.text}]
        return [{
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(self.image)}},
                {"type": "text", "text": self.text},
            ],
        }]


@dataclass
class Result:
    id: int
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def make_backend(llm: LLMSettings):
    if llm.backend == "vllm":
        return VLLMBackend(llm)
    if llm.backend == "openai":
        return OpenAIBackend(llm)
    raise ConfigError("llm.backend", f"{llm.backend!r} does not generate text "
                                     f"(expected one of {', '.join(GENERATIVE)})")


def _import_object(path: str):
    module, _, attr = path.partition(":")
    if not attr:
        module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError("llm.engine_factory", f"cannot import {path!r}: {exc}") from None


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def check_model_folder(model: str) -> None:
    """``llm.model`` given as a local folder (a path, or an existing folder) must hold a model: a
    ``config.json`` and weights. One line naming the folder otherwise, before vLLM is loaded (its
    own error is a traceback several screens long). A hub name (``org/name``) is left to vLLM."""
    path = Path(model).expanduser()
    pathlike = model.startswith(("/", "./", "../", "~")) or path.is_dir()
    if not pathlike:
        return
    if not path.is_dir():
        raise ConfigError("llm.model", f"{model}: no such folder (a local model folder, or a model name the "
                                       f"hub knows such as google/gemma-3-27b-it)")
    if not (path / "config.json").is_file():
        held = sorted(p.name for p in path.iterdir())[:5]
        raise ConfigError("llm.model", f"{path} is not a model folder: it has no config.json (it holds: "
                                       f"{', '.join(held) or 'nothing'}); for llm=tiny run `make install-llm`")
    if not any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        raise ConfigError("llm.model", f"{path} is not a model folder: config.json but no weights "
                                       f"({', '.join(WEIGHT_PATTERNS)})")


class VLLMBackend:
    """Offline batch inference: hands whole chunks of conversations to ``LLM.chat`` at once."""

    name = "vllm"

    def __init__(self, llm: LLMSettings):
        check_model_folder(llm.model)
        factory = ENGINE_FACTORY
        if factory is None and llm.vllm.engine_factory:
            factory = _import_object(llm.vllm.engine_factory)
        vllm = None
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # ImportError, or a broken CUDA install
            if factory is None:
                raise ConfigError("llm", VLLM_MISSING.format(reason=f"{type(exc).__name__}: {exc}".splitlines()[0])) from None
            vllm = None
        if factory is None:
            factory = vllm.LLM
        platform = vllm_engine.vllm_platform() if vllm is not None else "unknown"
        args = (llm.vllm.engine, llm.vllm.engine_extra, llm.model, platform, llm.sampling)
        engine = vllm_engine.engine_options(*args, explain=False)
        key = stable_hash({"model": llm.model, "engine": engine, "factory": repr(factory)})
        if key not in _ENGINES:
            vllm_engine.engine_options(*args, explain=True)  # the same options, with the reasons logged
            log.info("vllm: loading %s (%s)", llm.model, ", ".join(f"{k}={v}" for k, v in engine.items()))
            release_engines()  # one engine at a time on the GPU
            vllm_engine.bind_cpu_threads(platform, int(engine.get("tensor_parallel_size") or 1)
                                         * int(engine.get("pipeline_parallel_size") or 1))
            started = time.perf_counter()
            _ENGINES[key] = vllm_engine.load(factory, llm.model, engine)
            log.info("vllm: engine loaded in %.1f s (platform %s)", time.perf_counter() - started, platform)
        self.llm = _ENGINES[key]
        options = dict(llm.sampling)
        self.params = vllm.SamplingParams(**options) if vllm is not None else SimpleNamespace(**options)

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        outputs = self.llm.chat([r.messages() for r in requests], self.params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise MLLMRecError(f"vllm returned {len(outputs)} outputs for {len(requests)} requests")
        results = []
        for req, out in zip(requests, outputs):
            comp = out.outputs[0]
            results.append(Result(
                req.id,
                comp.text or "",
                str(comp.finish_reason or "unknown"),
                len(out.prompt_token_ids or ()),
                len(comp.token_ids or ()),
            ))
        return results

    def close(self) -> None:
        self.llm = None  # the engine stays loaded for the next stage; see release_engines


class _Stopped(MLLMRecError):
    """A request abandoned because another one failed for good."""


class OpenAIBackend:
    """POST {base_url}/chat/completions with bounded concurrency, retrying 408/429/5xx, timeouts and
    connection errors with exponential backoff and jitter; any other 4xx stops the run with one line."""

    name = "openai"

    def __init__(self, llm: LLMSettings):
        import httpx

        opts = llm.openai
        self.httpx = httpx
        self.url = f"{opts.base_url}/chat/completions"
        self.model = llm.model
        self.concurrency = opts.concurrency
        self.max_retries = opts.max_retries
        self.backoff_initial = opts.backoff_initial
        self.backoff_max = opts.backoff_max
        self.sampling = dict(llm.sampling)
        env = opts.api_key_env
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(str(env))
        if key:
            headers["Authorization"] = f"Bearer {key}"
        else:
            log.info("openai: $%s is not set; sending requests without an API key", env)
        del key
        timeout = opts.timeout
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="llm")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.error: MLLMRecError | None = None
        self.retries = 0  # retried attempts, for the log
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    # -- one request ------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.backoff_max, self.backoff_initial * 2 ** attempt) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_max))
            except ValueError:
                pass
        return delay

    @staticmethod
    def _server_message(resp) -> str:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        msg = body
        if isinstance(body, dict):
            err = body.get("error", body.get("message", body.get("detail", body)))
            msg = err.get("message", err) if isinstance(err, dict) else err
        return " ".join(str(msg).split())[:300] or resp.reason_phrase

    def _one(self, req: Request) -> Result:
        httpx = self.httpx
        body = {"model": self.model, "messages": req.messages(), **self.sampling}
        last = ""
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise _Stopped("openai: stopped after an error in another request")
            retry_after = None
            try:
                resp = self.client.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if isinstance(exc, httpx.ConnectError):
                    last += " (no server answers at llm.base_url: start it, or fix the URL)"
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        return self._parse(req, resp.json())
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        last = f"malformed answer ({type(exc).__name__}: {exc})"
                elif status in (408, 429) or status >= 500:
                    last = f"HTTP {status}: {self._server_message(resp)}"
                    retry_after = resp.headers.get("Retry-After")
                else:
                    hint = {401: " (check the API key variable named by llm.api_key_env)",
                            403: " (check the API key and its permissions)",
                            404: " (check llm.base_url, usually ending in /v1, and llm.model)"}.get(status, "")
                    self._fail(MLLMRecError(f"openai: {self.url}: HTTP {status} {resp.reason_phrase}: "
                                            f"{self._server_message(resp)}{hint}"))
            if attempt == self.max_retries:
                break
            self.retries += 1
            if self.stop.wait(self._delay(attempt, retry_after)):  # interruptible sleep
                raise _Stopped("openai: stopped after an error in another request")
        self._fail(MLLMRecError(f"openai: {self.url}: gave up after {self.max_retries + 1} attempts: {last}"))

    def _fail(self, error: MLLMRecError):
        """Record the first fatal error, stop the other requests (they would fail alike), raise it."""
        with self.lock:
            if self.error is None:
                self.error = error
        self.stop.set()
        raise error

    @staticmethod
    def _parse(req: Request, body: dict) -> Result:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        text = (choice.get("message") or {}).get("content") or ""
        return Result(req.id, text, str(choice.get("finish_reason") or "unknown"),
                      int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    # -- a chunk ----------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[Result]:
        futures = {self.pool.submit(self._one, r): n for n, r in enumerate(requests)}
        results: list[Result | None] = [None] * len(requests)
        try:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
        except BaseException as exc:
            self.stop.set()
            for fut in futures:
                fut.cancel()
            if isinstance(exc, _Stopped) and self.error is not None:
                raise self.error from None
            raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
