"""Encode stage (SPEC steps 5 and 13): sentence-transformers embeddings of item and user texts.

Each text set is its own artifact keyed by the hash of the texts and the encoder settings, so a
change upstream re-encodes only what changed, and nothing is encoded twice.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from mllmrec.cache import Artifact, ArtifactCache
from mllmrec.encoding import encode_texts, load_encoder
from mllmrec.vectors import random_unit_rows

log = logging.getLogger(__name__)

STAGE = "encode"
OUTPUT = "embeddings.npy"


def texts_hash(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class Encoder:
    """Loads the sentence-transformers model lazily: only when some text set is not cached yet."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_encoder(self.cfg.model, self.cfg.get("device"))
            if self.cfg.get("max_seq_length"):
                self._model.max_seq_length = int(self.cfg.max_seq_length)
        return self._model

    def settings(self) -> dict:
        return {"model": self.cfg.model, "normalize": bool(self.cfg.normalize), "max_seq_length": self.cfg.get("max_seq_length")}


def run(ecfg, cache: ArtifactCache, texts: list[str], kind: str, *, seed: int,
        encoder: Encoder | None = None) -> Artifact:
    """Embeddings of ``texts`` (``kind``: ``items`` or ``users``). ``ecfg``: the ``encoder`` node;
    ``seed``: the run's seed, used only by ``encoder.model=random``."""
    encoder = encoder or Encoder(ecfg)
    random = ecfg.model == "random"  # timing/benchmarks on interaction-only data: no text model

    def build(out):
        if random:
            log.warning("encode: encoder.model=random: %d %s get seeded random unit vectors, not text embeddings", len(texts), kind)
            emb = random_unit_rows(len(texts), int(ecfg.get("dim", 384)), f"{kind}:{seed}")
        else:
            log.info("encode: %d %s texts with %s", len(texts), kind, ecfg.model)
            emb = encode_texts(texts, encoder.model, batch_size=ecfg.batch_size, normalize=ecfg.normalize)
        np.save(out / OUTPUT, emb)
        return {"rows": int(emb.shape[0]), "dim": int(emb.shape[1]), "empty_texts": sum(1 for t in texts if not t)}

    config = {"kind": kind, **encoder.settings()}
    if random:
        config["seed"] = int(seed)
    # version 2 of the random vectors: drawn by mllmrec.vectors.random_unit_rows (other numbers than version 1's)
    inputs = {"texts": texts_hash(texts), "count": str(len(texts))}
    return cache.fetch(STAGE, config, inputs, build, version=2 if random else 1)


def load(artifact: Artifact) -> np.ndarray:
    return np.load(artifact.file(OUTPUT))
