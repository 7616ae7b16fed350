"""Text construction: item descriptions D^m_i (SPEC section 1, step 2) and the leakage warning."""

from __future__ import annotations

import logging
from typing import Sequence

from mllmrec.data import TEXT_FIELDS, RecData

log = logging.getLogger(__name__)

LEAK_WARNING = (
    "reason.history=all: the behaviour lists include VALIDATION and TEST items (the paper's "
    "protocol); held-out interactions leak into the user representation and inflate metrics"
)


def item_texts(data: RecData, descriptions: Sequence[str] | None = None) -> list[str]:
    """D^m_i: title, brand, categories, description (+ image description), joined with spaces."""
    columns = [data.item_field(c) for c in TEXT_FIELDS]
    if descriptions is not None:
        if len(descriptions) != data.n_items:
            raise ValueError(f"{len(descriptions)} image descriptions for {data.n_items} items")
        columns.append([d or "" for d in descriptions])
    return [" ".join(part for part in parts if part) for parts in zip(*columns)]
