"""Full-ranking evaluation metrics, vectorised over users (SPEC section 1; ``conf/eval``).

* :mod:`mllmrec.metrics.spec`: :class:`EvalSpec`, ``conf/eval`` checked (cut-offs, metrics, popularity
  groups, the selecting metric) and the metric names;
* :mod:`mllmrec.metrics.ranking`: evaluation batches, the one mask-then-rank step, Recall/NDCG;
* :mod:`mllmrec.metrics.beyond`: the other metrics (precision, map, hit, coverage, gini, avg_popularity,
  tail_percentage, recall per popularity group) from the same top-K, as additive sums per pass.
"""

from mllmrec.metrics.beyond import batch_sums, finalize, gini_index, popularity_groups, zero_sums
from mllmrec.metrics.ranking import (
    evaluate_batch,
    hits_at,
    make_eval_batch,
    masked_topk,
    pairs_of_rows,
    recall_ndcg,
    sorted_contains,
)
from mllmrec.metrics.spec import EvalSpec, base_metric, metric_names, short_label

__all__ = [
    "EvalSpec", "base_metric", "batch_sums", "evaluate_batch", "finalize", "gini_index", "hits_at",
    "make_eval_batch", "masked_topk", "metric_names", "pairs_of_rows", "popularity_groups", "recall_ndcg",
    "short_label", "sorted_contains", "zero_sums",
]
