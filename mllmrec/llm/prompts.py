"""Prompt templates (the paper's Prompt1/Prompt2 live in conf/describe and conf/reason), token
counting and fitting a behaviour list into the model's context.

Templates use named slots, ``{dataset_name}`` (Prompt1) and ``{behavioral_description}``
(Prompt2), filled by plain substitution: braces inside item texts or elsewhere in a template are
left alone (no ``str.format`` surprises).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from mllmrec.errors import ConfigError

log = logging.getLogger(__name__)

DATASET_SLOT = "{dataset_name}"
BEHAVIOUR_SLOT = "{behavioral_description}"
LIST_FORMATS = ("python", "numbered", "joined")
ELLIPSIS = "..."


def check_template(template: str, slot: str, key: str) -> str:
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(key, "must be a non-empty prompt template")
    if slot not in template:
        raise ConfigError(key, f"the prompt template has no {slot} slot")
    return template


def render(template: str, slot: str, value: str) -> str:
    return template.replace(slot, value)


def format_list(entries: Sequence[str], style: str = "python", separator: str = "; ") -> str:
    """The behaviour list as it enters Prompt2.

    ``python``: ``['D^m_1', 'D^m_2']``, what the official code sends (``str.format`` of a list);
    ``numbered``: one ``n. text`` line per item; ``joined``: entries joined with ``separator``.
    """
    if style == "python":
        return str([str(e) for e in entries])
    if style == "numbered":
        return "\n" + "\n".join(f"{n}. {e}" for n, e in enumerate(entries, 1)) + "\n" if entries else ""
    if style == "joined":
        return separator.join(entries)
    raise ConfigError("reason.list_format", f"must be one of {', '.join(LIST_FORMATS)}, got {style!r}")


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (at a word boundary when one is near), marked with '...'."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(ELLIPSIS), 0)
    cut = text[:keep]
    space = cut.rfind(" ")
    if space >= 0.6 * keep:
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + ELLIPSIS


class TokenCounter:
    """Counts prompt tokens with the model's tokenizer when one can be loaded, else ~4 chars/token.

    ``spec``: ``auto`` (the tokenizer of ``model`` through transformers, when it loads; heuristic
    otherwise), ``chars`` (heuristic only), or a tokenizer name/path. The tokenizer is loaded
    lazily: a prompt whose UTF-8 length is within the limit fits whatever the tokenizer (a token is
    at least one byte), so most prompts never need one.
    """

    CHARS_PER_TOKEN = 4

    def __init__(self, spec: str | None = "auto", model: str | None = None):
        self.spec = spec or "chars"
        self.model = model
        self._tok = None
        self._loaded = self.spec == "chars"

    @property
    def tokenizer(self):
        if not self._loaded:
            self._loaded = True
            name = self.model if self.spec == "auto" else self.spec
            if name:
                try:
                    from transformers import AutoTokenizer

                    self._tok = AutoTokenizer.from_pretrained(name)
                    log.info("prompts: counting tokens with the %s tokenizer", name)
                except Exception as exc:  # noqa: BLE001 - any failure falls back to the heuristic
                    if self.spec != "auto":
                        raise ConfigError("reason.tokenizer", f"cannot load tokenizer {name!r}: {exc}") from None
                    log.info("prompts: no tokenizer for %s (%s); estimating ~%d chars/token",
                             name, type(exc).__name__, self.CHARS_PER_TOKEN)
        return self._tok

    @property
    def name(self) -> str:
        return "chars/4" if self.tokenizer is None else str(self.spec if self.spec != "auto" else self.model)

    def count(self, text: str) -> int:
        tok = self.tokenizer
        if tok is None:
            return math.ceil(len(text) / self.CHARS_PER_TOKEN)
        return len(tok.encode(text, add_special_tokens=False))

    def fits(self, text: str, limit: int) -> bool:
        if len(text.encode("utf-8")) <= limit:
            return True
        return self.count(text) <= limit


def fit_behaviour_list(
    entries: Sequence[str],
    template: str,
    limit: int,
    counter: TokenCounter,
    style: str = "python",
    separator: str = "; ",
    min_item_chars: int = 200,
) -> tuple[str, int, int]:
    """Prompt2 for ``entries`` (oldest first) within ``limit`` tokens.

    Shortens the per-item descriptions first (each to the largest common length, not below
    ``min_item_chars``), then drops the OLDEST items. Returns (prompt, items shortened, items dropped).
    """
    entries = [str(e) for e in entries]
    fit = _Fitting(template, limit, counter, style, separator)
    prompt = fit.build(entries)
    if counter.fits(prompt, limit):
        return prompt, 0, 0
    if not fit.fits([]):
        raise ConfigError(
            "reason.max_prompt_tokens",
            f"{limit} tokens do not even hold the prompt template ({counter.count(fit.build([]))} tokens)",
        )
    floor = max(int(min_item_chars), len(ELLIPSIS) + 1)
    if fit.fits(_capped(entries, floor)):
        return fit.shortened(entries, floor, dropped=0)
    # even at the floor it is too long: drop the oldest items (smallest number that fits)
    dropped = fit.oldest_to_drop(entries, floor)
    kept = entries[dropped:]
    if kept and fit.fits(_capped(kept, floor)):
        return fit.shortened(kept, floor, dropped)
    return fit.newest_only(entries, floor)  # not even the newest item fits at the floor: cut it further


def _capped(entries: Sequence[str], cap: int) -> list[str]:
    return [shorten(e, cap) for e in entries]


@dataclass(frozen=True)
class _Fitting:
    """The steps of :func:`fit_behaviour_list`: Prompt2 of a list, and whether it fits ``limit``."""

    template: str
    limit: int
    counter: TokenCounter
    style: str
    separator: str

    def build(self, entries: Sequence[str]) -> str:
        return render(self.template, BEHAVIOUR_SLOT, format_list(entries, self.style, self.separator))

    def fits(self, entries: Sequence[str]) -> bool:
        return self.counter.fits(self.build(entries), self.limit)

    def shortened(self, entries: list[str], floor: int, dropped: int) -> tuple[str, int, int]:
        """Every entry capped at the largest length in [floor, longest] that fits (``floor`` must fit)."""
        lo, hi = floor, max(len(e) for e in entries)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fits(_capped(entries, mid)):
                lo = mid
            else:
                hi = mid - 1
        return self.build(_capped(entries, lo)), sum(len(e) > lo for e in entries), dropped

    def oldest_to_drop(self, entries: list[str], floor: int) -> int:
        """The fewest oldest entries to drop so that the rest, capped at ``floor``, fits (at least 1)."""
        lo, hi = 1, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fits(_capped(entries[mid:], floor)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def newest_only(self, entries: list[str], floor: int) -> tuple[str, int, int]:
        """The newest entry alone, halving its cap below ``floor`` until it fits; else an empty list."""
        newest, cap = entries[-1], floor
        while cap > len(ELLIPSIS) + 1 and not self.fits([shorten(newest, cap)]):
            cap //= 2
        if self.fits([shorten(newest, cap)]):
            return self.build([shorten(newest, cap)]), 1, len(entries) - 1
        return self.build([]), 0, len(entries)
