"""Raw Amazon 2014 reviews + metadata -> an MMRec-format dataset folder (``python -m stages.prepare``).

Input (McAuley's Amazon 2014 dumps, plain or gzip-compressed):

- reviews: JSON lines with ``reviewerID``, ``asin``, ``overall`` (rating), ``unixReviewTime``;
- metadata: one *Python literal* dict per line (``{'asin': ..., 'title': ..., 'categories': [[...]]}``),
  parsed with :func:`ast.literal_eval` (never ``eval``).

Steps, one module each, put together by :func:`prepare` (:mod:`~mllmrec.prepare.recipe`):
:mod:`~mllmrec.prepare.reviews` streams the reviews into compact arrays (only (user, item, rating,
time) per line is kept) and collapses duplicate (user, item) pairs to the latest review;
:mod:`~mllmrec.prepare.kcore` keeps the iterative k-core; :mod:`~mllmrec.prepare.ids` gives
contiguous ids in sorted order of the original ids; :mod:`~mllmrec.prepare.split` applies MMRec's
per-user split (or a chronological one); :mod:`~mllmrec.prepare.metadata` makes a second, streamed
pass over the metadata that parses only the lines of items that survived the k-core;
:mod:`~mllmrec.prepare.write` and :mod:`~mllmrec.prepare.report` write the folder.

Output (built in a temporary folder beside the destination and renamed into place when complete):
``<name>.inter`` (userID, itemID, rating, timestamp, x_label; tab-separated), ``meta-<name>.csv``
(itemID, asin, title, brand, categories, description, imUrl), ``i_id_mapping.csv`` (asin, itemID),
``u_id_mapping.csv`` (user_id, userID), both tab-separated, and ``prepare_report.json``.

Every function here works without Hydra; :mod:`mllmrec.stages.prepare` runs it from the ``prepare``
config node and ``stages/prepare.py`` is the command-line entry point.
"""

from mllmrec.prepare.ids import Interactions, renumber, sorted_ids
from mllmrec.prepare.job import Job, check_job
from mllmrec.prepare.kcore import apply_kcore, kcore_mask
from mllmrec.prepare.lines import MAX_WARNINGS, iter_lines
from mllmrec.prepare.metadata import META_COLUMNS, clean_text, load_metadata, meta_fields, read_metadata
from mllmrec.prepare.recipe import prepare
from mllmrec.prepare.report import REPORT, build_report, format_report, save_report
from mllmrec.prepare.reviews import Reviews, collapse_duplicates, load_reviews, read_reviews
from mllmrec.prepare.split import SPLIT_RULES, split_labels
from mllmrec.prepare.write import check_destination, publishing, write_dataset_files

__all__ = [
    "MAX_WARNINGS", "META_COLUMNS", "REPORT", "SPLIT_RULES", "Interactions", "Job", "Reviews", "apply_kcore",
    "build_report", "check_destination", "check_job", "clean_text", "collapse_duplicates", "format_report",
    "iter_lines", "kcore_mask", "load_metadata", "load_reviews", "meta_fields", "prepare", "publishing",
    "read_metadata", "read_reviews", "renumber", "save_report", "sorted_ids", "split_labels", "write_dataset_files",
]
