"""Early stopping with MMRec's rule (the official MLLMRec code runs inside MMRec).

MMRec keeps a counter of validation epochs that do not improve on the best score (strictly
greater is an improvement) and stops when the counter EXCEEDS ``stopping_step`` (20 by default):
training ends after the 21st non-improving epoch in a row. Lightning's ``EarlyStopping`` stops
when its counter REACHES ``patience``, so ``stopping_step`` here is MMRec's key and
``patience = stopping_step + 1``.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import EarlyStopping

from mllmrec.errors import ConfigError

KEY = "callbacks.early_stopping"


class MMRecEarlyStopping(EarlyStopping):
    """``EarlyStopping`` whose ``stopping_step`` means MMRec's ``stopping_step``.

    Improvement is strict (``min_delta`` stays 0): an epoch that only ties the best counts as
    non-improving, as in MMRec and as in ``ModelCheckpoint`` (which keeps the first best epoch).
    """

    def __init__(self, monitor: str, mode: str = "max", stopping_step: int = 20, **kwargs):
        if int(stopping_step) != stopping_step or stopping_step < 0:
            raise ConfigError(f"{KEY}.stopping_step", f"must be an integer >= 0, got {stopping_step!r}")
        if kwargs.pop("min_delta", 0.0):
            raise ConfigError(f"{KEY}.min_delta", "must stay 0 (MMRec's strict improvement)")
        if "patience" in kwargs:
            raise ConfigError(f"{KEY}.patience", "give stopping_step (MMRec's; patience = stopping_step + 1)")
        super().__init__(monitor=monitor, mode=mode, patience=int(stopping_step) + 1, min_delta=0.0, **kwargs)
        self.stopping_step = int(stopping_step)
