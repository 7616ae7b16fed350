"""Second pass: the metadata file -> the text fields of the items that survived the k-core.

Metadata lines are *Python literal* dicts (``{'asin': ..., 'title': ..., 'categories': [[...]]}``),
parsed with :func:`ast.literal_eval` (never ``eval``); lines of other items are skipped unparsed.
"""

from __future__ import annotations

import ast
import html
import json
import logging
import re
from pathlib import Path

from mllmrec.data import flatten_categories
from mllmrec.errors import DataError, one_line
from mllmrec.prepare.lines import Malformed, iter_lines

log = logging.getLogger(__name__)

META_COLUMNS = ("title", "brand", "categories", "description", "imUrl")
# Cheap look-up of a metadata line's asin, so that lines of items dropped by the k-core are
# skipped without being parsed. A line where it finds nothing is parsed in full.
_ASIN_RE = re.compile(rb"""['"]asin['"]\s*:\s*(?:'([^'\\]*)'|"([^"\\]*)")""")


def clean_text(value) -> str:
    """A metadata value as one line of readable text: HTML entities unescaped, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v) for v in value)
    return " ".join(html.unescape(str(value)).split())


def meta_fields(record: dict) -> dict[str, str]:
    """The text fields kept from one metadata record (missing ones empty)."""
    cats = record.get("categories")
    categories = flatten_categories(repr(cats)) if isinstance(cats, (list, tuple)) else str(cats or "")
    return {
        "title": clean_text(record.get("title")),
        "brand": clean_text(record.get("brand")),
        "categories": clean_text(categories),
        "description": clean_text(record.get("description")),
        "imUrl": str(record.get("imUrl") or "").strip(),
    }


def _meta_record(text: str):
    """A Python-literal line (``ast.literal_eval``, never ``eval``); a strict-JSON line (``null``,
    ``true``) also passes. Raises the literal parser's error when neither applies."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        if text.startswith("{"):
            try:
                return json.loads(text)
            except ValueError:
                pass
        raise exc


def _parse_line(line: bytes) -> tuple[str, dict[str, str]]:
    """The asin and the kept fields of one metadata line; ValueError (and the parser's errors) if malformed."""
    record = _meta_record(line.decode("utf-8").strip())
    if not isinstance(record, dict):
        raise ValueError(f"expected a dict literal, got {type(record).__name__}")
    asin = record.get("asin")
    if not isinstance(asin, str) or not asin.strip():
        raise ValueError("no 'asin'")
    return asin.strip(), meta_fields(record)


def read_metadata(
    path: str | Path, wanted: dict[str, int], *, strict: bool = False, progress: bool = True
) -> tuple[dict[int, dict[str, str]], dict]:
    """Second pass: the fields of the items in ``wanted`` (asin -> itemID), streamed.

    Lines of other items are skipped without being parsed. A malformed line is warned about and
    skipped (fatal with ``strict``); for an asin listed twice the first line is kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "metadata file not found (set prepare.meta)")
    found: dict[int, dict[str, str]] = {}
    malformed = Malformed(path, "metadata", strict)
    n_lines = duplicates = skipped = 0
    for lineno, line in iter_lines(path, f"metadata {path.name}", progress):
        n_lines = lineno
        if not line.strip():
            continue
        hit = _ASIN_RE.search(line)
        if hit is not None:
            asin = (hit.group(1) if hit.group(1) is not None else hit.group(2)).decode("utf-8", "replace").strip()
            if asin not in wanted:
                skipped += 1
                continue
        try:
            asin, fields = _parse_line(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            malformed(lineno, one_line(exc, 200))
            continue
        item = wanted.get(asin)
        if item is None:
            skipped += 1
        elif item in found:
            duplicates += 1
        else:
            found[item] = fields
    stats = {
        "meta_lines": n_lines,
        "meta_malformed_lines": malformed.count,
        "meta_malformed_first_lines": malformed.first_lines,
        "meta_duplicate_lines": duplicates,
        "meta_lines_of_dropped_items": skipped,
    }
    return found, stats


def load_metadata(
    path: Path | None, item_names: list[str], name: str, *, strict: bool, progress: bool
) -> tuple[dict[int, dict[str, str]] | None, dict]:
    """The metadata of the kept items (None without a metadata file) and its counts, ending with
    ``items_without_meta``; missing metadata is warned about."""
    if path is None:
        log.warning("prepare.meta is not set: no meta-%s.csv is written (items have no text)", name)
        return None, {"items_without_meta": len(item_names)}
    rows, stats = read_metadata(path, {a: i for i, a in enumerate(item_names)}, strict=strict, progress=progress)
    without_meta = len(item_names) - len(rows)
    if without_meta:
        log.warning("%s: %d of %d kept items have no metadata line (empty text)", path, without_meta, len(item_names))
    return rows, {**stats, "items_without_meta": without_meta}
