"""Wires the stages: data -> describe -> reason -> encode -> graph, reusing cached artifacts.

:func:`build_inputs` (and :func:`modality_inputs`, its variant for the multimodal baselines) is
the one place that reads across config groups: it builds the data and the artifact cache once
and hands each stage (:mod:`mllmrec.stages`) its own config node and explicit inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.cache import Artifact, ArtifactCache
from mllmrec.data import RecData, load_dataset
from mllmrec.llm.settings import LLMSettings
from mllmrec.mm.features import feature_files, load_modalities
from mllmrec.stages import describe, encode, graph, reason
from mllmrec.texts import item_texts
from mllmrec.vectors import random_unit_rows

log = logging.getLogger(__name__)

STAGE_ORDER = ("describe", "reason", "encode", "graph")


@dataclass
class Inputs:
    data: RecData
    user_features: np.ndarray | None = None
    item_features: np.ndarray | None = None  # E*, the propagated item features
    modalities: dict[str, np.ndarray] | None = None  # raw item modality features (multimodal baselines)
    artifacts: dict[str, Artifact] = field(default_factory=dict)


def load_data(cfg: DictConfig) -> RecData:
    data = load_dataset(cfg.dataset.name, cfg.dataset.data_dir)
    log.info("%s", data.summary())
    return data


def build_inputs(cfg: DictConfig, until: str = "graph") -> Inputs:
    """Run (or reuse) every stage up to ``until`` and return what training needs."""
    mconfig.validate(cfg)
    llm = LLMSettings.from_config(cfg.llm)  # checked once, before any work; handed down typed
    data = load_data(cfg)
    cache = ArtifactCache.from_config(cfg)
    out = Inputs(data)
    stop = STAGE_ORDER.index(until)

    descriptions = None  # D^s_i: image descriptions (none with llm=none)
    if llm.backend != "none":
        label = cfg.dataset.get("display_name") or cfg.dataset.name  # the dataset as Prompt1 names it
        described = describe.run(cfg.get("describe"), llm, data, cache, str(label))
        if described is not None:
            out.artifacts["describe"] = described
            descriptions = describe.load_texts(described)
    if stop < 1:
        return out
    texts = item_texts(data, descriptions)  # D^m_i: item text (+ image description)
    random_users = cfg.model.get("user_init", "preference") == "random"  # "w/o RS"
    if not random_users or stop < 2:  # w/o RS never uses the preferences: no LLM time spent on them
        out.artifacts["reason"] = reason.run(cfg.reason, llm, data, cache, texts)
    if stop < 2:
        return out
    seed = int(cfg.seed)
    encoder = encode.Encoder(cfg.encoder)
    items_art = encode.run(cfg.encoder, cache, texts, "items", seed=seed, encoder=encoder)
    out.artifacts["encode/items"] = items_art
    features = encode.load(items_art)
    if random_users:  # fixed random unit vectors as user inputs, seeded
        out.user_features = random_unit_rows(data.n_users, features.shape[1], seed)
    else:
        users_texts = reason.load_texts(out.artifacts["reason"])
        users_art = encode.run(cfg.encoder, cache, users_texts, "users", seed=seed, encoder=encoder)
        out.artifacts["encode/users"] = users_art
        out.user_features = encode.load(users_art)
    if stop < 3:
        out.item_features = features
        return out
    graph_art = graph.run(cfg.graph, data, cache, features, items_art.key)
    out.artifacts["graph"] = graph_art
    out.item_features = graph.load_item_star(graph_art)
    return out


def modality_inputs(cfg: DictConfig) -> Inputs:
    """Training inputs of a multimodal baseline: the data and its item modalities (the encode
    stage runs, cached, only when ``dataset.features`` names no text file)."""
    files = feature_files(cfg.dataset.get("features"), cfg.dataset.data_dir)
    if "text" in files:
        mconfig.validate(cfg)
        inputs = Inputs(load_data(cfg))
    else:
        inputs = build_inputs(cfg, until="encode")
    inputs.modalities = load_modalities(files, inputs.data.n_items, inputs.item_features)
    if "text" not in files:
        log.info("text modality: the encode stage's item embeddings (%s)", cfg.encoder.model)
    inputs.item_features = inputs.user_features = None  # the models take the modalities only
    return inputs


def stage_cli(stage: str) -> None:
    """``python -m stages.<stage> [overrides]``: run the stage (and what it needs), print artifact paths."""
    import hydra

    from mllmrec.errors import report_errors

    @hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="stage")
    @report_errors
    def main(cfg: DictConfig) -> None:
        from mllmrec.llm.runner import ShardDone

        try:
            inputs = build_inputs(cfg, until=stage)
        except ShardDone as done:  # llm.shard: this job's share is saved; not an error
            log.info("%s", done)
            return
        for name, art in inputs.artifacts.items():
            print(f"{name}: {art.path}{' (reused)' if art.reused else ''}")

    main()
