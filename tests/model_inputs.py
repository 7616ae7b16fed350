"""The ``inputs`` argument of a module built directly in a test (``Module(inputs, ...)``, see
:mod:`mllmrec.models.base`): a dataset whose training split is ``train`` (no valid/test rows) and the
given features."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from mllmrec.data import RecData
from mllmrec.models.base import Inputs


def inputs_of(train=None, shape: tuple[int, int] | None = None, **features) -> Inputs:
    """``train``: a users x items 0/1 matrix (dense or sparse); or ``shape`` (n_users, n_items) for
    a dataset without interactions; ``features``: ``user_features``, ``item_features``, ``modalities``."""
    if train is None:
        train = sp.csr_matrix(shape, dtype=np.float32)
    coo = sp.coo_matrix(train)
    users, items = coo.row.astype(np.int64), coo.col.astype(np.int64)
    data = RecData("test", coo.shape[0], coo.shape[1], users, items, np.zeros(len(users), np.int8))
    return Inputs(data, **features)
