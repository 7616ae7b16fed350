"""Seeded random unit vectors: the "w/o RS" user inputs, the ``encoder=random`` test encoder and
the benchmarks' random features all draw them here."""

from __future__ import annotations

import hashlib

import numpy as np


def seed_of(salt: str) -> int:
    """A stable integer seed from a string (e.g. ``"items:999"``)."""
    return int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16)


def random_unit_rows(n: int, dim: int, seed: int | str) -> np.ndarray:
    """``n`` float32 rows of length 1 in ``dim`` dimensions, standard normal directions, seeded
    (an int, or a string hashed by :func:`seed_of`)."""
    rng = np.random.default_rng(seed_of(seed) if isinstance(seed, str) else int(seed))
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
