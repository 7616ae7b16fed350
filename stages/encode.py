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

log = logging.getLogger(__name__)

STAGE = "encode"
OUTPUT = "embeddings.npy"


def texts_hash(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def random_unit_vectors(n: int, dim: int, salt: str) -> np.ndarray:
    seed = int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16)
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


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


def run(cfg, cache: ArtifactCache, texts: list[str], kind: str, encoder: Encoder | None = None) -> Artifact:
    encoder = encoder or Encoder(cfg.encoder)

    def build(out):
        if cfg.encoder.model == "random":  # timing/benchmarks on interaction-only data: no text model
            log.warning("encode: encoder.model=random: %d %s get seeded random unit vectors, not text embeddings", len(texts), kind)
            emb = random_unit_vectors(len(texts), int(cfg.encoder.get("dim", 384)), f"{kind}:{cfg.seed}")
        else:
            log.info("encode: %d %s texts with %s", len(texts), kind, cfg.encoder.model)
            emb = encode_texts(texts, encoder.model, batch_size=cfg.encoder.batch_size, normalize=cfg.encoder.normalize)
        np.save(out / OUTPUT, emb)
        return {"rows": int(emb.shape[0]), "dim": int(emb.shape[1]), "empty_texts": sum(1 for t in texts if not t)}

    config = {"kind": kind, **encoder.settings()}
    if cfg.encoder.model == "random":
        config["seed"] = int(cfg.seed)
    return cache.fetch(STAGE, config, {"texts": texts_hash(texts), "count": str(len(texts))}, build)


def load(artifact: Artifact) -> np.ndarray:
    return np.load(artifact.file(OUTPUT))


if __name__ == "__main__":
    from mllmrec.pipeline import stage_cli

    stage_cli(STAGE)
