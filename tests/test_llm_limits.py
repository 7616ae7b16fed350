"""Smoke limits (``llm.limit``), sharding (``llm.num_shards``/``llm.shard`` and the merge), the
pre-run estimate and ETA lines, and the vLLM engine options on CPU, with the fake engine (fast).
The same behaviours on the real engine: tests/test_vllm_real.py (make test-llm)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import llm_settings, run_module, tiny_overrides
from llm_fakes import sent_prompts
from mllmrec.cache import ArtifactCache
from mllmrec.errors import ConfigError
from mllmrec.llm import engine as vllm_engine, runner

TESTS = Path(__file__).resolve().parent


def _reason(compose_cfg, tiny_data, *over, cache=None):
    from mllmrec.stages import reason

    cfg = compose_cfg("llm=vllm", "llm.chunk_size=8", *over)
    return reason.run(cfg.reason, llm_settings(cfg), tiny_data, ArtifactCache(cache or cfg.paths.cache_dir, "tiny"))


def _users(art) -> pd.DataFrame:
    return pd.read_parquet(art.file("users.parquet"))


def _all_prompts(compose_cfg, tiny_data) -> list[str]:
    from mllmrec.texts import item_texts
    from mllmrec.stages import reason

    cfg = compose_cfg()
    requests, _ = reason.build_requests(reason.ReasonSettings.from_config(cfg.reason), None, tiny_data,
                                        item_texts(tiny_data))
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
    assert re.search(r"reason: 5/5 requests done \(100%\), [\d.]+ requests/s, [\d.]+ generated tokens/s, ETA 0m00s", log)

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


def test_cpu_threads_bound_to_every_core_of_a_small_machine_unless_the_user_chose(monkeypatch, caplog):
    bind = vllm_engine.cpu_thread_binding
    assert bind("cpu", {}, {0, 1}) == "0,1"  # vLLM's auto binding would keep core 1 for its scheduler
    assert bind("cpu", {}, {5, 2, 3}) == "2,3,5"
    assert bind("cpu", {"VLLM_CPU_OMP_THREADS_BIND": "0"}, {0, 1}) is None  # the user's binding stands
    assert bind("cpu", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, {0, 1}) is None  # so does a reserved count
    assert bind("cuda", {}, {0, 1}) is None and bind("unknown", {}, {0, 1}) is None
    assert bind("cpu", {}, {0}) is None  # one core: nothing to share
    assert bind("cpu", {}, {0, 1}, workers=2) is None  # tensor parallel: one list per worker, vLLM's own
    assert bind("cpu", {}, set(range(vllm_engine.SMALL_CPU_COUNT + 1))) is None  # a bigger machine: vLLM's own
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.setenv(name, "x")  # recorded, so the value set below is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(vllm_engine.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.INFO):
        vllm_engine.bind_cpu_threads("cpu")
    assert vllm_engine.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"  # inherited by the engine's processes
    assert "VLLM_CPU_OMP_THREADS_BIND=0,1" in caplog.text
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    vllm_engine.bind_cpu_threads("cpu")
    assert vllm_engine.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_vllm_config_errors_become_one_line():
    def refuse(model, **kw):
        raise ValueError("1 validation error for ModelConfig\nmax_num_seqs\n  Input should be a valid integer")

    with pytest.raises(ConfigError) as err:
        vllm_engine.load(refuse, "m", {"max_num_seqs": "x"})
    assert "\n" not in str(err.value) and "max_num_seqs Input should be a valid integer" in str(err.value)
    assert str(err.value).startswith("config 'llm.engine': vLLM refused the engine settings for m")


# ------------------------------------------------------------------ select before building
FITTED = ("reason.max_prompt_tokens=90", "reason.min_item_chars=40", "reason.tokenizer=chars")  # every prompt fitted


def _full_build_then_select(cfg, data, cache_dir):
    """The reference: the order before llm.limit / llm.shard picked first. Every user's prompt is
    fitted, then the selection is applied to the requests, then the runner answers the chosen ones."""
    from mllmrec.stages import reason
    from mllmrec.texts import item_texts

    rs, llm = reason.ReasonSettings.from_config(cfg.reason), llm_settings(cfg)
    requests, counts = reason.build_requests(rs, llm.model, data, item_texts(data))
    picked = runner.pick("reason", [r.id for r in requests], llm.selection)
    chosen = [r for r in requests if r.id in set(picked.chosen)]
    return runner.generate(ArtifactCache(cache_dir, "tiny"), "reason", llm, id_column="userID", n_rows=data.n_users,
                           requests=chosen, picked=picked, prompt=rs.prompt, output="users.parquet",
                           assembly={"postprocess": rs.postprocess, "history": rs.history},
                           fill_reason="empty_history", counts=counts)


def _saved(cache_dir) -> list[tuple]:
    """Every saved answer of the reason stage's work folders, sorted."""
    parts = sorted((Path(cache_dir) / "tiny" / "reason").glob(".work-*/part-*.parquet"))
    rows = [tuple(r) for p in parts for r in pd.read_parquet(p).itertuples(index=False)]
    return sorted(rows)


@pytest.mark.parametrize("over", [(), ("llm.limit=6",), ("llm.limit=6", "llm.limit_seed=3")])
def test_selecting_first_gives_the_artifact_of_building_everything_first(compose_cfg, tiny_data, fake_engine,
                                                                         tmp_path, over):
    cfg = compose_cfg("llm=vllm", "llm.chunk_size=4", *FITTED, *over)
    new = _reason(compose_cfg, tiny_data, "llm.chunk_size=4", *FITTED, *over, cache=tmp_path / "new")
    sent = sent_prompts(fake_engine)
    ref = _full_build_then_select(cfg, tiny_data, tmp_path / "ref")
    assert sent_prompts(fake_engine)[len(sent):] == sent  # the same prompts, bit for bit, in the same order
    assert new.key == ref.key and new.manifest["config"] == ref.manifest["config"]
    pd.testing.assert_frame_equal(_users(new), _users(ref))
    assert _saved(tmp_path / "new") == _saved(tmp_path / "ref")
    for key in ("requests", "over_limit", "finish_reasons", "users_without_history", "prompt_tokens"):
        assert new.manifest["counts"][key] == ref.manifest["counts"][key], key
    assert new.manifest["counts"]["prompts_fitted"] == len(sent)  # counted over the prompts built


@pytest.mark.parametrize("limit, missing", [((), (26, 13, 0)), (("llm.limit=8",), (5, 2, 0))])
def test_shards_save_and_merge_what_building_everything_first_did(compose_cfg, tiny_data, fake_engine, tmp_path,
                                                                  limit, missing):
    for shard in range(3):
        over = ("llm.chunk_size=4", *FITTED, *limit, "llm.num_shards=3", f"llm.shard={shard}")
        # other shards' prompts are not built: what is known unanswered are their ids without any answer
        status = f"at least {missing[shard]} requests of other shards are not answered yet: " if missing[shard] else ""
        with pytest.raises(runner.ShardDone, match=re.escape(f"generated now); {status}run without llm.shard")):
            _reason(compose_cfg, tiny_data, *over, cache=tmp_path / "new")
        with pytest.raises(runner.ShardDone, match=f"shard {shard} of 3 is done"):
            _full_build_then_select(compose_cfg("llm=vllm", *over), tiny_data, tmp_path / "ref")
        assert _saved(tmp_path / "new") == _saved(tmp_path / "ref"), shard
    sent = len(sent_prompts(fake_engine))
    merged = _reason(compose_cfg, tiny_data, "llm.chunk_size=4", *FITTED, *limit, cache=tmp_path / "new")
    ref = _full_build_then_select(compose_cfg("llm=vllm", "llm.chunk_size=4", *FITTED, *limit), tiny_data,
                                  tmp_path / "ref")
    assert len(sent_prompts(fake_engine)) == sent  # both merges found every answer saved
    assert merged.key == ref.key
    pd.testing.assert_frame_equal(_users(merged), _users(ref))


@pytest.mark.parametrize("over, users", [
    (("llm.limit=6",), list(range(6))),
    (("llm.limit=6", "llm.limit_seed=3"), sorted(__import__("random").Random(3).sample(range(40), 6))),
    (("llm.limit=8", "llm.num_shards=3", "llm.shard=1"), [1, 4, 7]),
    (("llm.num_shards=4", "llm.shard=2"), list(range(2, 40, 4))),
])
def test_only_the_selected_prompts_are_fitted_and_tokenized(compose_cfg, tiny_data, fake_engine, monkeypatch,
                                                            over, users):
    from mllmrec.llm import prompts
    from mllmrec.texts import item_texts

    fitted, counted = [], []
    fit, count = prompts.fit_behaviour_list, prompts.TokenCounter.count
    monkeypatch.setattr(prompts, "fit_behaviour_list", lambda entries, *a, **k: fitted.append(list(entries))
                        or fit(entries, *a, **k))
    monkeypatch.setattr(prompts.TokenCounter, "count", lambda self, text: counted.append(text) or count(self, text))
    try:
        _reason(compose_cfg, tiny_data, *FITTED, *over)
    except runner.ShardDone:
        pass
    texts, histories = item_texts(tiny_data), tiny_data.history("train")  # every tiny user has a history
    assert fitted == [[texts[i] for i in histories[u]] for u in users]
    in_run = len(counted)
    for u in users:  # the same users fitted on their own: the token counts fitting them needs
        fit([texts[i] for i in histories[u]], compose_cfg().reason.prompt, 90, prompts.TokenCounter("chars"),
            min_item_chars=40)
    assert in_run == (len(counted) - in_run) + len(users)  # + one count per request for the pre-run line
