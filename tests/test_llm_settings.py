"""The ``llm`` and ``reason`` settings, checked once: defaults read from the presets (the yaml files,
loaded here on their own), one-line errors naming the key, unknown and missing keys refused, and a
bad setting refused before any work."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from conftest import llm_settings
from mllmrec.config import CONF_DIR
from mllmrec.errors import ConfigError
from mllmrec.llm.settings import LLMSettings, Selection


def _preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "llm" / f"{name}.yaml"))


def test_the_defaults_are_the_presets(compose_cfg):
    vllm, openai, replay = (llm_settings(compose_cfg(f"llm={b}")) for b in ("vllm", "openai", "replay"))
    for settings, name in ((vllm, "vllm"), (openai, "openai")):
        yaml = _preset(name)
        assert (settings.backend, settings.model, settings.chunk_size) == (name, yaml["model"], yaml["chunk_size"])
        assert settings.sampling == {k: v for k, v in yaml["sampling"].items() if v is not None}
        assert settings.selection == Selection(None, None, 1, None)
        # the cache key's part: what it was before the settings object (backend, model, non-null sampling)
        assert settings.generation_settings() == {"backend": name, "model": yaml["model"], "sampling": settings.sampling}
    yaml = _preset("vllm")
    assert dataclasses.asdict(vllm.vllm) == {"engine": yaml["engine"], "engine_extra": {}, "engine_factory": None}
    yaml = _preset("openai")
    assert dataclasses.asdict(openai.openai) == {
        "base_url": yaml["base_url"], "api_key_env": yaml["api_key_env"], "concurrency": yaml["concurrency"],
        "timeout": yaml["timeout"], "max_retries": yaml["max_retries"], "backoff_initial": yaml["backoff"]["initial"],
        "backoff_max": yaml["backoff"]["max"]}
    assert dataclasses.asdict(replay.replay) == {k: v for k, v in _preset("replay").items() if k != "backend"}
    assert llm_settings(compose_cfg()) == LLMSettings("none")
    with pytest.raises(dataclasses.FrozenInstanceError):
        vllm.chunk_size = 1


@pytest.mark.parametrize("over, message", [
    (("llm=vllm", "llm.limit=0"), "config 'llm.limit': must be null or an integer >= 1, got 0"),
    (("llm=vllm", "llm.limit=2.5"), "config 'llm.limit': must be null or an integer >= 1, got 2.5"),
    (("llm=vllm", "llm.limit_seed=-1"), "config 'llm.limit_seed': must be null or an integer >= 0, got -1"),
    (("llm=vllm", "llm.num_shards=2", "llm.shard=2"), "config 'llm.shard': must be in 0..1 (llm.num_shards=2), got 2"),
    (("llm=vllm", "llm.chunk_size=0"), "config 'llm.chunk_size': must be an integer >= 1, got 0"),
    (("llm=vllm", "llm.chunk_size=true"), "config 'llm.chunk_size': must be an integer >= 1, got True"),
    (("llm=vllm", "llm.model=null"), "config 'llm.model': name the model (a folder, or the name the server knows), "
                                     "got None"),
    (("llm=vllm", "llm.engine_factory=5"), "config 'llm.engine_factory': must be null or a non-empty string, got 5"),
    (("llm=openai", "llm.concurrency=0"), "config 'llm.concurrency': must be an integer >= 1, got 0"),
    (("llm=openai", "llm.timeout=0"), "config 'llm.timeout': must be a number > 0, got 0"),
    (("llm=openai", "llm.max_retries=-1"), "config 'llm.max_retries': must be an integer >= 0, got -1"),
    (("llm=openai", "llm.backoff.max=-1"), "config 'llm.backoff.max': must be a number >= 0, got -1"),
    (("llm=openai", "llm.api_key_env=null"), "config 'llm.api_key_env': must be a non-empty string, got None"),
    (("llm=openai", "llm.base_url=localhost:8000"),
     "config 'llm.base_url': must be an http(s) URL such as http://localhost:8000/v1, got 'localhost:8000'"),
    (("llm=replay", "llm.user_id_column=null"), "config 'llm.user_id_column': must be a non-empty string, got None"),
])
def test_each_bad_llm_setting_is_one_line_naming_its_key(compose_cfg, over, message):
    with pytest.raises(ConfigError) as err:
        llm_settings(compose_cfg(*over))
    assert str(err.value) == message


@pytest.mark.parametrize("over, message", [
    ("reason.max_prompt_tokens=8", "config 'reason.max_prompt_tokens': must be an integer >= 16, got 8"),
    ("reason.min_item_chars=many", "config 'reason.min_item_chars': must be an integer >= 8, got 'many'"),
    ("reason.list_format=table", "config 'reason.list_format': must be one of python, numbered, joined, got 'table'"),
    ("reason.postprocess=upper", "config 'reason.postprocess': must be one of strip, last_paragraph, got 'upper'"),
    ("reason.separator=null", "config 'reason.separator': must be a string, got None"),
    ("reason.prompt='no slot'", "config 'reason.prompt': the prompt template has no {behavioral_description} slot"),
])
def test_each_bad_reason_setting_is_one_line_naming_its_key(compose_cfg, over, message):
    from mllmrec.stages import reason

    with pytest.raises(ConfigError) as err:
        reason.ReasonSettings.from_config(compose_cfg(over).reason)
    assert str(err.value) == message


def test_unknown_and_missing_keys_are_refused():
    node = _preset("vllm")
    LLMSettings.from_config(node)  # the preset as it is
    with pytest.raises(ConfigError, match=r"^config 'llm.chunksize': not a setting of llm.backend=vllm \(its settings: "
                                          r"model, chunk_size, sampling, limit"):
        LLMSettings.from_config({**node, "chunksize": 8})
    with pytest.raises(ConfigError, match=r"^config 'llm.concurrency': not a setting of llm.backend=vllm"):
        LLMSettings.from_config({**node, "concurrency": 8})  # an openai setting
    with pytest.raises(ConfigError, match=r"^config 'llm.chunk_size': must be an integer >= 1, got None$"):
        LLMSettings.from_config({k: v for k, v in node.items() if k != "chunk_size"})  # no default in the code
    with pytest.raises(ConfigError, match=r"^config 'llm.backend': unknown backend 'gpt' \(none, replay, vllm, openai\)$"):
        LLMSettings.from_config({"backend": "gpt"})


def test_a_bad_setting_stops_the_pipeline_before_any_work(compose_cfg, fake_engine, tmp_path, monkeypatch):
    from mllmrec import pipeline

    monkeypatch.setattr(pipeline, "load_data", lambda cfg: pytest.fail("the data was loaded before the check"))
    cfg = compose_cfg("llm=vllm", "llm.chunk_size=0", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match="config 'llm.chunk_size'"):
        pipeline.build_inputs(cfg, until="reason")
    assert not fake_engine and not (tmp_path / "cache" / "tiny").exists()  # no engine, no stage ran
