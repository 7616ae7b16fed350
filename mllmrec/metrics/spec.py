"""``conf/eval`` as a checked value: the cut-offs, the metrics computed, the popularity groups and the
selecting metric.

Metric names as logged and written to ``metrics.json``: ``<split>/<metric>@K`` for every metric of
``eval.metrics`` and every K of ``eval.topk`` (``test/map@20``, ``test/coverage@20``), and
``<split>/recall@K_head`` / ``_mid`` / ``_tail`` for ``recall_groups`` (Recall@K over each
training-popularity group of items; :mod:`mllmrec.metrics.beyond`).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from mllmrec.config import CONF_DIR
from mllmrec.errors import ConfigError

# per-user accuracy metrics (MMRec's set: recall, ndcg, precision, map; plus hit): each user's value, averaged
ACCURACY = ("recall", "ndcg", "precision", "map", "hit")
# beyond accuracy: per-user (avg_popularity, tail_percentage) or over the catalogue (coverage, gini)
PER_USER_BEYOND = ("avg_popularity", "tail_percentage")
CATALOGUE = ("coverage", "gini")
GROUPED = "recall_groups"  # Recall@K per popularity group: recall@K_head, recall@K_mid, recall@K_tail
KNOWN = (*ACCURACY, *PER_USER_BEYOND, *CATALOGUE, GROUPED)
GROUPS = ("head", "mid", "tail")
# a selector is maximised: these measure who is recommended, not whether it is right (gini and
# avg_popularity are even lower-is-better); a random ranking would win on them
NOT_SELECTORS = (*PER_USER_BEYOND, *CATALOGUE)

LABELS = {"recall": "R", "ndcg": "N", "precision": "P", "map": "MAP", "hit": "HR", "coverage": "Cov",
          "gini": "Gini", "avg_popularity": "AvgPop", "tail_percentage": "Tail%"}


def metric_names(ks, metrics=("recall", "ndcg")) -> tuple[str, ...]:
    """``<metric>@K`` for each metric (in the order given), each K; ``recall_groups`` gives
    ``recall@K_head``, ``recall@K_mid``, ``recall@K_tail`` for each K."""
    out = []
    for m in metrics:
        if m == GROUPED:
            out += [f"recall@{k}_{g}" for k in ks for g in GROUPS]
        else:
            out += [f"{m}@{k}" for k in ks]
    return tuple(out)


def base_metric(name: str) -> str:
    """``test/recall@20_tail`` -> ``recall``, ``map@10`` -> ``map``."""
    return name.rpartition("/")[2].partition("@")[0]


def short_label(metric: str) -> str:
    """``val/recall@20`` -> ``R@20``, ``test/ndcg@10`` -> ``N@10``, ``test/recall@20_tail`` -> ``R@20_tail``,
    ``test/coverage@20`` -> ``Cov@20`` (table and plot labels)."""
    name = metric.rpartition("/")[2]
    head, _, tail = name.partition("@")
    return LABELS.get(head, head) + "@" + tail


def _number_list(value, key: str, what: str) -> tuple:
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(key, f"must be a list of {what}, got {value!r}") from None


@dataclass(frozen=True)
class EvalSpec:
    """What evaluation computes (``topk``, ``metrics``, ``group_cuts``) and what selects
    (``valid_metric``), from ``conf/eval``."""

    topk: tuple[int, ...]
    valid_metric: str
    metrics: tuple[str, ...] = ("recall", "ndcg")
    # the popularity groups: items ranked by training popularity (most popular first, ties by item id);
    # head = the first group_cuts[0] share of the items, tail = the items after the group_cuts[1] share
    group_cuts: tuple[float, float] = (0.2, 0.5)

    @classmethod
    def from_config(cls, node=None) -> "EvalSpec":
        """``cfg.eval`` (a DictConfig, a dict or None) over ``conf/eval/default.yaml``, checked: a one-line
        ConfigError names the key."""
        merged = OmegaConf.merge(OmegaConf.load(CONF_DIR / "eval" / "default.yaml"), node or {})
        plain = OmegaConf.to_container(merged)
        topk = merged.topk
        try:
            ks = tuple(sorted({int(k) for k in topk}))
            ok = bool(ks) and all(int(k) == k and k >= 1 for k in topk)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError("eval.topk", f"must be a non-empty list of integers >= 1, got {plain['topk']!r}")
        metrics = tuple(str(m) for m in _number_list(plain.get("metrics", ["recall", "ndcg"]), "eval.metrics", "names"))
        unknown = [m for m in metrics if m not in KNOWN]
        if unknown or not metrics or len(set(metrics)) != len(metrics):
            why = (f"unknown metric {unknown[0]!r}" if unknown else "is empty" if not metrics
                   else f"names a metric twice: {list(metrics)}")
            raise ConfigError("eval.metrics", f"{why}; known: {', '.join(KNOWN)}")
        cuts = _number_list(plain.get("popularity_groups", [0.2, 0.5]), "eval.popularity_groups", "two shares")
        try:
            cuts = tuple(float(c) for c in cuts)
        except (TypeError, ValueError):
            cuts = ()
        if len(cuts) != 2 or not all(0 < c < 1 for c in cuts) or not cuts[0] < cuts[1]:
            raise ConfigError("eval.popularity_groups", "must be two shares of the items 0 < head < tail < 1 (head: the "
                              "most popular share, tail: the items beyond the second share), got "
                              f"{plain.get('popularity_groups')!r}")
        spec = cls(ks, str(merged.valid_metric), metrics, cuts)
        if base_metric(spec.valid_metric) in NOT_SELECTORS:
            raise ConfigError("eval.valid_metric", f"{spec.valid_metric!r} measures who is recommended, not whether it "
                              "is right, so it cannot select (a random ranking would win); select on "
                              f"{', '.join(ACCURACY)} or recall@K_<group>")
        if spec.valid_metric not in spec.names:
            raise ConfigError("eval.valid_metric", f"{spec.valid_metric!r} is not computed: eval.topk={list(ks)}, "
                              f"eval.metrics={list(metrics)} give {', '.join(spec.names)}")
        return spec

    @classmethod
    def default(cls) -> "EvalSpec":
        return cls.from_config(None)

    @property
    def names(self) -> tuple[str, ...]:
        return metric_names(self.topk, self.metrics)

    @property
    def select(self) -> str:
        """The selecting metric as logged: ``val/<valid_metric>``."""
        return f"val/{self.valid_metric}"

    def columns(self, split: str) -> tuple[str, ...]:
        return tuple(f"{split}/{m}" for m in self.names)

    @property
    def needs_popularity(self) -> bool:
        """Whether evaluation needs the items' training popularity (``item_pop`` of the batches)."""
        return any(m in self.metrics for m in (*PER_USER_BEYOND, GROUPED))
