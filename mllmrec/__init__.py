"""mllmrec: an experiment platform for LLM-driven multimodal recommendation (MLLMRec)."""

__version__ = "0.1.0"
