"""Smoke limits (``llm.limit``), sharding (``llm.num_shards``/``llm.shard`` and the merge), the
pre-run estimate and ETA lines, and the vLLM engine options on CPU, with the fake engine (fast).
The same behaviours on the real engine: tests/test_vllm_real.py (make test-llm)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_module, tiny_overrides
from llm_fakes import sent_prompts
from mllmrec.cache import ArtifactCache
from mllmrec.errors import ConfigError
from mllmrec.llm import engine as vllm_engine, runner

TESTS = Path(__file__).resolve().parent


def _reason(compose_cfg, tiny_data, *over, cache=None):
    from mllmrec.stages import reason

    cfg = compose_cfg("llm=vllm", "llm.chunk_size=8", *over)
    return reason.run(cfg.reason, cfg.llm, tiny_data, ArtifactCache(cache or cfg.paths.cache_dir, "tiny"))


def _users(art) -> pd.DataFrame:
    return pd.read_parquet(art.file("users.parquet"))


def _all_prompts(compose_cfg, tiny_data) -> list[str]:
    from mllmrec.texts import item_texts
    from mllmrec.stages import reason

    cfg = compose_cfg()
    requests, _, _ = reason.build_requests(cfg.reason, cfg.llm, tiny_data, item_texts(tiny_data), "train")
    return [r.text for r in requests]


def test_limit_answers_the_first_n_and_the_full_run_reuses_them(compose_cfg, tiny_data, fake_engine, caplog):
    prompts = _all_prompts(compose_cfg, tiny_data)
    with caplog.at_level(logging.INFO):
        art = _reason(compose_cfg, tiny_data, "llm.limit=5")
    assert sent_prompts(fake_engine) == prompts[:5]
    df = _users(art)
    assert (df.text[:5] != "").all() and set(df.finish_reason[5:]) == {"over_limit"} and (df.text[5:] == "").all()
    assert art.manifest["counts"]["over_limit"] == 35
    log = caplog.text
    assert "llm.limit=5: 5 of 40 requests (first)" in log
    assert "5 requests to generate" in log and "prompt tokens" in log and "at most 960 new tokens" in log
    assert "first chunk of 5 in" in log and "ETA for the other 0" in log

    full = _reason(compose_cfg, tiny_data)  # the limit is not part of the answers' key: 5 reused
    assert sent_prompts(fake_engine) == prompts[:5] + prompts[5:]
    assert full.key != art.key and full.manifest["counts"]["reused_saved_answers"] == 5
    assert (_users(full).text != "").all()


def test_limit_seed_draws_a_reproducible_sample(compose_cfg, tiny_data, fake_engine, tmp_path):
    prompts = _all_prompts(compose_cfg, tiny_data)
    picked = []
    for n, seed in enumerate((7, 7, 8)):
        before = len(sent_prompts(fake_engine))
        _reason(compose_cfg, tiny_data, "llm.limit=6", f"llm.limit_seed={seed}", cache=tmp_path / f"c{n}")
        picked.append(sent_prompts(fake_engine)[before:])
    assert picked[0] == picked[1] and picked[0] != picked[2]
    assert len(set(picked[0])) == 6 and picked[0] != prompts[:6]
    assert picked[0] == [p for p in prompts if p in picked[0]]  # in request order


def test_shards_answer_disjoint_parts_and_the_next_run_merges(compose_cfg, tiny_data, fake_engine, tmp_path):
    reference = _users(_reason(compose_cfg, tiny_data, cache=tmp_path / "plain"))
    fake_engine[0].calls.clear()
    cache = tmp_path / "sharded"
    parts = []
    for shard in range(3):
        with pytest.raises(runner.ShardDone, match=f"shard {shard} of 3 is done"):
            _reason(compose_cfg, tiny_data, "llm.num_shards=3", f"llm.shard={shard}", cache=cache)
        parts.append(sent_prompts(fake_engine)[sum(map(len, parts)):])
    prompts = _all_prompts(compose_cfg, tiny_data)
    assert [len(p) for p in parts] == [14, 13, 13]
    assert sorted(sum(parts, [])) == sorted(prompts) and parts[1] == prompts[1::3]
    assert not [p for p in (cache / "tiny" / "reason").iterdir() if not p.name.startswith(".")]  # unpublished
    merged = _reason(compose_cfg, tiny_data, cache=cache)
    assert len(sent_prompts(fake_engine)) == 40  # nothing sent again
    assert merged.manifest["counts"]["reused_saved_answers"] == 40
    pd.testing.assert_frame_equal(_users(merged), reference)


@pytest.mark.parametrize("over, key", [
    (("llm.num_shards=3", "llm.shard=3"), "llm.shard"),
    (("llm.shard=0",), "llm.shard"),
    (("llm.limit=0",), "llm.limit"),
    (("llm.num_shards=0",), "llm.num_shards"),
])
def test_limit_and_shard_settings_are_checked_up_front(compose_cfg, tiny_data, fake_engine, over, key):
    with pytest.raises(ConfigError, match=f"config '{key}'"):
        _reason(compose_cfg, tiny_data, *over)
    assert not fake_engine  # refused before any engine was loaded


@pytest.mark.slow
def test_shard_job_from_the_command_line_ends_normally(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    args = tiny_overrides(tmp_path / "out", "llm=vllm", "llm.engine_factory=llm_fakes:FakeLLM", "llm.num_shards=2",
                          "llm.shard=1", "logger=none", data_dir=tiny_dir, run=tmp_path / "run")
    proc = run_module("mllmrec.train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reason: shard 1 of 2 is done (20 requests, 20 generated now)" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "shard_done"


# ------------------------------------------------------------------ engine options
def _folder(tmp_path, **cfg) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", **cfg}))
    return str(tmp_path)


def test_cpu_engine_defaults(tmp_path, caplog):
    text_model = _folder(tmp_path / "text")
    base = {"max_model_len": 4096, "gpu_memory_utilization": 0.9, "limit_mm_per_prompt": {"image": 1}, "dtype": None}
    with caplog.at_level(logging.INFO):
        cpu = vllm_engine.engine_options(base, {}, text_model, "cpu", {"seed": 0})
    assert cpu["enforce_eager"] is True and cpu["enable_chunked_prefill"] is False
    assert cpu["kv_cache_memory_bytes"] == 2**30 and "dtype" not in cpu
    assert "limit_mm_per_prompt" not in cpu  # a text-only model
    assert "CPU Generator does not use offset" in caplog.text
    unseeded = vllm_engine.engine_options(base, {}, text_model, "cpu", {"seed": None})
    assert "enable_chunked_prefill" not in unseeded
    chosen = vllm_engine.engine_options(base, {"enforce_eager": False, "enable_chunked_prefill": True},
                                        text_model, "cpu", {"seed": 0})
    assert chosen["enforce_eager"] is False and chosen["enable_chunked_prefill"] is True  # the user's word stands
    gpu = vllm_engine.engine_options(base, {}, _folder(tmp_path / "vlm", vision_config={}), "cuda", {"seed": 0})
    assert gpu == {"max_model_len": 4096, "gpu_memory_utilization": 0.9, "limit_mm_per_prompt": {"image": 1}}


def test_vllm_config_errors_become_one_line():
    def refuse(model, **kw):
        raise ValueError("1 validation error for ModelConfig\nmax_num_seqs\n  Input should be a valid integer")

    with pytest.raises(ConfigError) as err:
        vllm_engine.load(refuse, "m", {"max_num_seqs": "x"})
    assert "\n" not in str(err.value) and "max_num_seqs Input should be a valid integer" in str(err.value)
    assert str(err.value).startswith("config 'llm.engine': vLLM refused the engine settings for m")
