"""The model zoo as the tests see it: every ``conf/model/<name>.yaml``, its class and what it needs.
A new config is covered by the zoo-wide tests (``test_every_model.py``, ``test_mm_leakage.py``,
``test_layout.py``) without editing them."""

from __future__ import annotations

from omegaconf import OmegaConf

from mllmrec.config import CONF_DIR

MODEL_CONFS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_node(name: str):
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


def model_class(name: str):
    from hydra.utils import get_class

    return get_class(model_node(name)["_target_"])


def small_overrides(name: str) -> list[str]:
    """Overrides that shrink a model for a fast test: every embedding-size key it has set to 16."""
    node = model_node(name)
    return [f"model.{k}=16" for k in ("d", "feat_embed_dim", "embedding_dim") if k in node]


def has_item_graph_refinement(name: str) -> bool:
    """Does ``graph.refine=true`` change this model (its yaml interpolates ``refine: ${graph.refine}``)?"""
    return "refine" in model_node(name)


# What a model needs on the zoo tests' planted data (mm_planted.planted_data: 60 items > 48 users):
# SOIL's official R normalisation reads user degrees at item ids and refuses more items than users
# (its official form is tested for leakage in test_mm_soil.py on a planted set with more users).
PLANTED_OVERRIDES = {"soil": ["model.mm_r_norm=item_degrees"]}


def planted_overrides(name: str) -> list[str]:
    return list(PLANTED_OVERRIDES.get(name, []))


# What the gradient test (test_gradients.py) sets on top of the small sizes: SOIL as on the planted data;
# SMORE's preference dropout (0 by default) on, so that its mask is part of the checked gradient.
GRADIENT_OVERRIDES = {**PLANTED_OVERRIDES, "smore": ["model.dropout=0.1"]}


def gradient_overrides(name: str) -> list[str]:
    return list(GRADIENT_OVERRIDES.get(name, []))
