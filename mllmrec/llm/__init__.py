"""LLM side of MLLMRec (SPEC section 1, steps 1-4): backends, prompts, item images, and the
resumable chunked runner used by :mod:`mllmrec.stages.describe` and :mod:`mllmrec.stages.reason`.
See docs/llm.md.

To replace ``vllm.LLM`` (tests, custom engines) set ``mllmrec.llm.backends.ENGINE_FACTORY`` or
``llm.engine_factory=module:callable``."""

from mllmrec.llm.backends import OpenAIBackend, Request, Result, VLLMBackend, make_backend

__all__ = ["OpenAIBackend", "Request", "Result", "VLLMBackend", "make_backend"]
