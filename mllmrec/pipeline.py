"""Wires the stages: data -> describe -> reason -> encode -> graph, reusing cached artifacts.

:func:`build_inputs` (and :func:`modality_inputs`, its variant for the multimodal baselines) is
the one place that reads across config groups: it builds the data and the artifact cache once
and hands each stage (:mod:`mllmrec.stages`) its own config node and explicit inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from mllmrec import cold_start
from mllmrec import config as mconfig
from mllmrec.cache import ArtifactCache
from mllmrec.cache.integrity import file_hash
from mllmrec.data import RecData, load_dataset
from mllmrec.errors import ConfigError
from mllmrec.llm.settings import LLMSettings
from mllmrec.metrics import EvalSpec
from mllmrec.models.base import Inputs
from mllmrec.models.modalities import data_path, feature_files, load_feature_file, load_modalities
from mllmrec.stages import describe, encode, graph, reason
from mllmrec.texts import item_texts
from mllmrec.vectors import random_unit_rows

log = logging.getLogger(__name__)

STAGE_ORDER = ("describe", "reason", "encode", "graph")


def load_data(cfg: DictConfig) -> RecData:
    """The dataset under its split (``dataset.split``: the file's, or :mod:`mllmrec.cold_start`'s)."""
    cold_start.check(cfg.dataset)
    data = cold_start.apply(load_dataset(cfg.dataset.name, cfg.dataset.data_dir), cfg.dataset)
    log.info("%s", data.summary())
    return data


def released_features(dataset: DictConfig, data: RecData) -> dict[str, tuple[np.ndarray, str]]:
    """``dataset.item_features`` / ``dataset.user_features``: released MLLMRec feature files (e.g. the
    official Baby folder's ``image_text_feat.npy``, ``user_preferences_feat.npy``; row = itemID /
    userID), as ``{"items"|"users": (matrix, cache key of the file's content)}``."""
    out = {}
    for kind, row, key in (("items", "item", "item_features"), ("users", "user", "user_features")):
        name = dataset.get(key)
        if name:
            path = data_path(name, dataset.data_dir)
            matrix = load_feature_file(path, data.n_items if row == "item" else data.n_users, row, f"dataset.{key}")
            out[kind] = matrix, f"file:{file_hash(path)}"
            log.info("%s: %s (%d x %d), released features: describe/reason/encode skipped for them", key, path,
                     *matrix.shape)
    return out


def _item_texts(cfg: DictConfig, llm: LLMSettings, data: RecData, cache: ArtifactCache, out: Inputs) -> list[str]:
    """D^m_i: each item's text, plus its image description (describe stage) when an LLM is set."""
    descriptions = None  # D^s_i: image descriptions (none with llm=none)
    if llm.backend != "none":
        label = cfg.dataset.get("display_name") or cfg.dataset.name  # the dataset as Prompt1 names it
        described = describe.run(cfg.get("describe"), llm, data, cache, str(label))
        if described is not None:
            out.artifacts["describe"] = described
            descriptions = describe.load_texts(described)
    return item_texts(data, descriptions)


def _encoded(cfg: DictConfig, cache: ArtifactCache, texts: list[str], kind: str, out: Inputs,
             encoder: encode.Encoder) -> tuple[np.ndarray, str]:
    art = encode.run(cfg.encoder, cache, texts, kind, seed=int(cfg.seed), encoder=encoder)
    out.artifacts[f"encode/{kind}"] = art
    return encode.load(art), art.key


def build_inputs(cfg: DictConfig, until: str = "graph") -> Inputs:
    """Run (or reuse) every stage up to ``until`` and return what training needs. Released feature
    files (``dataset.item_features`` / ``user_features``) replace the stages that would produce them."""
    mconfig.validate(cfg)
    llm = LLMSettings.from_config(cfg.llm)  # checked once, before any work; handed down typed
    data = load_data(cfg)
    cache = ArtifactCache.from_config(cfg)
    out = Inputs(data)
    stop = STAGE_ORDER.index(until)
    released = released_features(cfg.dataset, data) if stop >= 2 else {}
    random_users = cfg.model.get("user_init", "preference") == "random"  # "w/o RS"
    reasoned_users = not random_users and "users" not in released  # the preference texts are needed
    texts = None
    if stop < 2 or "items" not in released or reasoned_users:
        texts = _item_texts(cfg, llm, data, cache, out)
    if stop < 1:
        return out
    if reasoned_users or stop < 2:  # w/o RS never uses the preferences: no LLM time spent on them
        out.artifacts["reason"] = reason.run(cfg.reason, llm, data, cache, texts)
    if stop < 2:
        return out
    encoder = encode.Encoder(cfg.encoder)
    features, features_key = released.get("items") or _encoded(cfg, cache, texts, "items", out, encoder)
    if random_users:  # fixed random unit vectors as user inputs, seeded
        out.user_features = random_unit_rows(data.n_users, features.shape[1], int(cfg.seed))
    elif "users" in released:
        out.user_features = released["users"][0]
    else:
        users_texts = reason.load_texts(out.artifacts["reason"])
        out.user_features = _encoded(cfg, cache, users_texts, "users", out, encoder)[0]
    if stop < 3:
        out.item_features = features
        return out
    graph_art = graph.run(cfg.graph, data, cache, features, features_key)
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


def prepare_inputs(cfg: DictConfig) -> Inputs:
    """Data plus the inputs the model class declares it needs (``needs``, see :mod:`mllmrec.models.base`):
    ``"features"``: the stage artifacts (reason -> encode -> graph); ``"modalities"``: the item
    modality features; ``"ids"``: the interactions only."""
    model_cls = get_class(cfg.model._target_)
    cold_start.check(cfg.dataset, model_cls, OmegaConf.select(cfg, "model.name") or model_cls.__name__)
    needs = model_cls.needs
    if needs == "features":
        return build_inputs(cfg)
    if needs == "modalities":
        return modality_inputs(cfg)
    mconfig.validate(cfg)
    return Inputs(load_data(cfg))


def build_model(cfg: DictConfig, inputs: Inputs):
    """``cfg.model`` instantiated (its ``optimizer`` node as a factory), called with ``inputs``, and
    given the run's evaluation settings (``cfg.eval``)."""
    if "optimizer" not in cfg.model:
        raise ConfigError("model.optimizer", "missing: every model needs an optimizer node (conf/model/*.yaml)")
    model = instantiate(cfg.model, _partial_=True)(inputs)
    model.eval_spec = EvalSpec.from_config(cfg.get("eval"))
    return model


def stage_cli(stage: str) -> None:
    """``python -m stages.<stage> [overrides]``: run the stage (and what it needs), print artifact paths."""
    import hydra

    from mllmrec.errors import report_errors

    @hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="stage")
    @report_errors
    def main(cfg: DictConfig) -> None:
        from mllmrec.llm.runner import ShardDone
        from hydra.core.hydra_config import HydraConfig

        from mllmrec.resume import write_metrics

        def run_dir():
            return Path(HydraConfig.get().runtime.output_dir)

        try:
            inputs = build_inputs(cfg, until=stage)
        except ShardDone as done:  # llm.shard: this job's share is saved; not an error
            log.info("%s", done)
            write_metrics(run_dir(), {"status": "shard_done", "message": str(done)})  # for a multirun's summary
            return
        for name, art in inputs.artifacts.items():
            print(f"{name}: {art.path}{' (reused)' if art.reused else ''}")
        write_metrics(run_dir(), {"status": "completed", "artifacts": {k: str(a.path) for k, a in inputs.artifacts.items()}})

    main()
