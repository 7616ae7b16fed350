"""LLM plumbing: prompts and fitting, the fake vLLM engine, the resumable runner, the OpenAI client
against a real local HTTP stub, image downloads, replay files, and the API key never being written."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pandas as pd
import pytest

from conftest import llm_settings
from llm_fakes import FakeLLM, StubServer, sent_prompts
from mllmrec.cache import ArtifactCache
from mllmrec.errors import ConfigError, DataError, MLLMRecError
from mllmrec.llm import backends, prompts, runner
from mllmrec.llm.backends import Request

SECRET = "sk-test-DO-NOT-WRITE-7f3a9c"


def _png(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    """Images for items 0..19 (by itemID), none for 20..29."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(_png((i * 10, 0, 0)))
    return folder


def _cache(cfg):
    return ArtifactCache(cfg.paths.cache_dir, cfg.dataset.name)


# ---------------------------------------------------------------- prompts
def test_prompt_templates_are_the_papers_and_render_safely(compose_cfg):
    cfg = compose_cfg()
    assert cfg.describe.prompt.startswith("Please convert the given image into an accurate and concise textual description relevant to the {dataset_name}, focusing")
    assert cfg.describe.prompt.endswith("overview in no more than 100 words.")
    assert "The list is: {behavioral_description}. To generate the user preferences using a one-paragraph" in cfg.reason.prompt
    text = prompts.render(cfg.reason.prompt, prompts.BEHAVIOUR_SLOT, prompts.format_list(["a {x}", "it's b"]))
    assert "The list is: ['a {x}', \"it's b\"]." in text  # braces in item text are harmless
    assert prompts.format_list(["a", "b"], "numbered") == "\n1. a\n2. b\n"
    assert prompts.format_list(["a", "b"], "joined", " | ") == "a | b"
    with pytest.raises(ConfigError, match="reason.prompt"):
        prompts.check_template("no slot here", prompts.BEHAVIOUR_SLOT, "reason.prompt")


def test_fit_shortens_descriptions_first_then_drops_the_oldest():
    counter = prompts.TokenCounter("chars")
    template = "List: {behavioral_description}."
    entries = [f"item{n} " + "word " * 60 for n in range(6)]  # ~306 chars each, oldest first
    full, short, dropped = prompts.fit_behaviour_list(entries, template, 10_000, counter)
    assert (short, dropped) == (0, 0) and full == prompts.render(template, prompts.BEHAVIOUR_SLOT, str(entries))

    # fits once every description is cut to a common length (>= min_item_chars): nothing dropped
    limit = counter.count(prompts.render(template, prompts.BEHAVIOUR_SLOT, str([e[:250] for e in entries])))
    fitted, short, dropped = prompts.fit_behaviour_list(entries, template, limit, counter, min_item_chars=100)
    assert dropped == 0 and short == 6 and counter.count(fitted) <= limit
    assert all(f"item{n}" in fitted for n in range(6)) and "..." in fitted

    # too long even at min_item_chars: the OLDEST items go, the newest stay
    fitted, short, dropped = prompts.fit_behaviour_list(entries, template, 120, counter, min_item_chars=100)
    assert dropped > 0 and counter.count(fitted) <= 120
    assert "item5" in fitted and "item0" not in fitted
    kept = [n for n in range(6) if f"item{n}" in fitted]
    assert kept == list(range(6 - len(kept), 6))

    with pytest.raises(ConfigError, match="reason.max_prompt_tokens"):
        prompts.fit_behaviour_list(entries, template, 2, counter)


# ---------------------------------------------------------------- vLLM backend (fake engine)
def test_describe_hands_whole_chunks_to_llm_chat(compose_cfg, tiny_data, image_dir, fake_engine):
    from mllmrec.stages import describe

    base = ("llm=vllm", f"describe.image_dir={image_dir}", "llm.chunk_size=8", "llm.engine.max_model_len=4096")
    cfg = compose_cfg(*base)
    art = describe.run(cfg.describe, llm_settings(cfg), tiny_data, _cache(cfg), cfg.dataset.display_name)
    (engine,) = fake_engine
    assert engine.model == "google/gemma-3-27b-it"
    assert engine.kwargs["max_model_len"] == 4096 and engine.kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert [len(c) for c in engine.calls] == [8, 8, 4]  # 20 images in chunks of 8, never one by one
    conv = engine.calls[0][0]
    parts = conv[0]["content"]
    assert conv[0]["role"] == "user" and parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
    assert parts[1]["text"].startswith("Please convert the given image")
    assert f"relevant to the {cfg.dataset.display_name}, focusing" in parts[1]["text"]
    sp = engine.sampling_params
    assert (sp.temperature, sp.top_p, sp.max_tokens, sp.seed) == (1.0, 0.95, 192, 0)

    df = pd.read_parquet(art.file(describe.OUTPUT))
    assert list(df.columns) == ["itemID", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert df["itemID"].tolist() == list(range(30))
    texts = describe.load_texts(art)
    assert all(t.startswith("A sturdy item in colour") for t in texts[:20])  # preface dropped (last paragraph)
    assert texts[20:] == [""] * 10 and set(df["finish_reason"][20:]) == {"no_image"}
    counts = art.manifest["counts"]
    assert counts["no_image"] == 10 and counts["images"] == 20 and counts["requests"] == 20
    assert counts["finish_reasons"] == {"no_image": 10, "stop": 20}
    assert art.manifest["config"]["model"] == "google/gemma-3-27b-it"

    # unchanged settings: reused, nothing sent; a changed prompt or sampling option regenerates
    # (on the same loaded engine: it is kept for the next stage until release_engines)
    again = describe.run(cfg.describe, llm_settings(cfg), tiny_data, _cache(cfg), cfg.dataset.display_name)
    assert again.reused and again.key == art.key and len(engine.answered) == 20
    changed_cfg = compose_cfg(*base, "describe.prompt='Describe this {dataset_name} product.'")
    changed = describe.run(changed_cfg.describe, llm_settings(cfg), tiny_data, _cache(cfg), cfg.dataset.display_name)
    assert changed.key != art.key and len(engine.answered) == 40
    assert engine.calls[-1][0][0]["content"][1]["text"] == f"Describe this {cfg.dataset.display_name} product."
    other_sampling = describe.run(cfg.describe, llm_settings(compose_cfg(*base, "llm.sampling.temperature=0.2")),
                                  tiny_data, _cache(cfg), cfg.dataset.display_name)
    assert other_sampling.key not in (art.key, changed.key) and len(engine.answered) == 60
    assert engine.sampling_params.temperature == 0.2 and len(fake_engine) == 1


def test_missing_vllm_is_one_line_with_the_install_command(compose_cfg, tiny_data, monkeypatch):
    from mllmrec.stages import reason

    monkeypatch.setattr(backends, "ENGINE_FACTORY", None)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    cfg = compose_cfg("llm=vllm")
    with pytest.raises(ConfigError) as ei:
        reason.run(cfg.reason, llm_settings(cfg), tiny_data, _cache(cfg))
    msg = str(ei.value)
    assert "\n" not in msg and "pip install 'mllmrec[vllm]'" in msg and "CUDA" in msg
    assert not list((_cache(cfg).root / "tiny" / "reason").glob("[!.]*"))  # nothing published


# ---------------------------------------------------------------- resumable runner
class CrashAfterTwo(FakeLLM):
    fail_after_calls = 2


def test_interrupted_run_resumes_without_resending_or_duplicating(compose_cfg, tiny_data, monkeypatch):
    from mllmrec.stages import reason

    FakeLLM.instances = []
    backends.release_engines()
    cfg = compose_cfg("llm=vllm", "llm.chunk_size=6")
    cache = _cache(cfg)
    monkeypatch.setattr(backends, "ENGINE_FACTORY", CrashAfterTwo)
    with pytest.raises(RuntimeError, match="fake engine crashed"):
        reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
    first = sent_prompts(FakeLLM.instances)
    assert len(first) == 12  # two chunks answered, then the crash
    stage_dir = cache.root / "tiny" / "reason"
    assert [p.name for p in stage_dir.iterdir() if not p.name.startswith(".")] == []  # nothing published
    (work,) = stage_dir.glob(".work-*")
    assert len(list(work.glob("part-*.parquet"))) == 2

    FakeLLM.instances = []
    monkeypatch.setattr(backends, "ENGINE_FACTORY", FakeLLM)
    art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
    second = sent_prompts(FakeLLM.instances)
    assert len(second) == tiny_data.n_users - 12 and not set(first) & set(second)  # finished ones not sent again
    df = pd.read_parquet(art.file(reason.OUTPUT))
    assert df["userID"].tolist() == list(range(tiny_data.n_users))  # one row per user, no duplicate
    assert (df["text"] != "").all() and set(df["finish_reason"]) == {"stop"}
    counts = art.manifest["counts"]
    assert counts["reused_saved_answers"] == 12 and counts["generated_now"] == tiny_data.n_users - 12
    assert reason.load_texts(art) == df["text"].tolist()
    FakeLLM.instances = []


def test_work_store_dedups_and_skips_damaged_parts(tmp_path):
    store = runner.WorkStore(tmp_path / ".work-x")
    reqs = [Request(0, "a"), Request(1, "b")]
    res = [backends.Result(0, "A", "stop", 1, 1), backends.Result(1, "B", "stop", 1, 1)]
    store.save(reqs, res)
    store.save(reqs[:1], res[:1])  # a concurrent duplicate
    (store.folder / "part-0-torn.parquet").write_bytes(b"PAR1 not really")
    rows = store.load()
    assert sorted(k[0] for k in rows) == [0, 1]
    assert not list(store.folder.glob(".*.tmp"))


# ---------------------------------------------------------------- OpenAI-compatible server
def _openai(cfg_fn, server, *extra):
    return cfg_fn("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=stub-model",
                  "llm.backoff.initial=0.01", "llm.backoff.max=0.05", *extra)


def test_openai_retries_429_and_5xx_then_succeeds(compose_cfg, tiny_data, monkeypatch):
    from mllmrec.stages import reason

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with StubServer(fail_first=2, fail_statuses=(429, 500)) as server:
        cfg = _openai(compose_cfg, server, "llm.concurrency=4", "llm.chunk_size=16")
        art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, _cache(cfg))
    n = tiny_data.n_users
    assert len(server.requests) == 3 * n and len(server.ok_requests()) == n
    assert sorted(r["status"] for r in server.requests).count(429) == n
    body = server.requests[0]["body"]
    assert body["model"] == "stub-model" and body["max_tokens"] == 192 and body["seed"] == 0 and "top_k" not in body
    assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"].startswith("Please reason")
    assert all(r["headers"].get("Authorization") == f"Bearer {SECRET}" for r in server.requests)
    df = pd.read_parquet(art.file(reason.OUTPUT))
    assert df["userID"].tolist() == list(range(n)) and df["text"].str.startswith("The user likes").all()
    assert art.manifest["counts"]["prompt_tokens"] > 0 and art.manifest["counts"]["completion_tokens"] > 0


def test_openai_other_4xx_stops_with_one_line(compose_cfg, tiny_data):
    from mllmrec.stages import reason

    with StubServer(fatal=(400, "model 'stub-model' does not exist\nat all")) as server:
        cfg = _openai(compose_cfg, server)
        with pytest.raises(MLLMRecError) as ei:
            reason.run(cfg.reason, llm_settings(cfg), tiny_data, _cache(cfg))
    msg = str(ei.value)
    assert "\n" not in msg and "HTTP 400" in msg and "model 'stub-model' does not exist at all" in msg
    # a 4xx is not retried, and the rest of the chunk is cancelled (a few may already be in flight)
    prompts_sent = [r["body"]["messages"][0]["content"] for r in server.requests]
    assert len(set(prompts_sent)) == len(prompts_sent) < tiny_data.n_users


def test_openai_gives_up_after_max_retries(compose_cfg, tiny_data):
    from mllmrec.stages import reason

    with StubServer(fail_first=100, fail_statuses=(503,)) as server:
        cfg = _openai(compose_cfg, server, "llm.max_retries=2", "llm.concurrency=1", "llm.chunk_size=1")
        with pytest.raises(MLLMRecError, match=r"gave up after 3 attempts: HTTP 503"):
            reason.run(cfg.reason, llm_settings(cfg), tiny_data, _cache(cfg))
    assert len(server.requests) == 3


def test_openai_concurrency_is_bounded_and_used(compose_cfg):
    with StubServer(delay=0.05) as server:
        llm = llm_settings(compose_cfg("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=m",
                                       "llm.concurrency=4", "llm.max_retries=0", "llm.sampling.max_tokens=8"))
        backend = backends.make_backend(llm)
        try:
            t0 = time.perf_counter()
            results = backend.generate([Request(i, f"prompt {i}") for i in range(16)])
            elapsed = time.perf_counter() - t0
        finally:
            backend.close()
    assert [r.id for r in results] == list(range(16))
    assert server.max_in_flight == 4
    assert elapsed < 16 * 0.05 * 0.6  # well below the serial time


# ---------------------------------------------------------------- images
def test_images_are_downloaded_once_with_retries(compose_cfg, tiny_copy, fake_engine):
    from mllmrec.data import load_dataset
    from mllmrec.stages import describe

    with StubServer(images={"0.png": (_png(), 0), "1.png": (_png((0, 0, 9)), 1), "2.png": (None, None),
                            "3.png": (b"<html>oops</html>", 0)}) as server:
        meta = pd.read_csv(tiny_copy / "meta-tiny.csv", dtype=str, keep_default_na=False)
        meta["imUrl"] = ""
        for i in range(4):
            meta.loc[meta.itemID == str(i), "imUrl"] = f"{server.url}/img/{i}.png"
        meta.to_csv(tiny_copy / "meta-tiny.csv", index=False)
        data = load_dataset("tiny", tiny_copy)
        cfg = compose_cfg("llm=vllm", "describe.download.backoff=0.01", data_dir=tiny_copy)
        art = describe.run(cfg.describe, llm_settings(cfg), data, _cache(cfg), cfg.dataset.display_name)
        gets = dict(server.image_gets)
        # nothing fetched again (failures are remembered)
        again = describe.run(cfg.describe, llm_settings(cfg), data, _cache(cfg), cfg.dataset.display_name)
        assert server.image_gets == gets
    assert gets["1.png"] == 2 and gets["2.png"] == 1 and gets["3.png"] == 1  # retried 500, not 404 / not-an-image
    images = _cache(cfg).root / "tiny" / "images"
    assert sorted(p.name for p in images.iterdir() if not p.name.startswith(".")) == ["0.png", "1.png", "2.failed", "3.failed"]
    counts = art.manifest["counts"]
    assert counts["images"] == 2 and counts["download_failed"] == 2 and counts["no_url"] == 26
    texts = describe.load_texts(art)
    assert texts[0] and texts[1] and not any(texts[2:])
    assert again.key == art.key and len(fake_engine[0].answered) == 2


# ---------------------------------------------------------------- replay
def test_replay_reads_the_official_layouts(compose_cfg, tiny_data, tmp_path, caplog):
    from mllmrec.stages import describe, reason

    items = pd.DataFrame({"itemID": range(30), "title": "t", "description": "meta text",
                          "image_description": [f"img {i}" for i in range(30)]})
    items.to_csv(tmp_path / "output_image2text.csv", index=False)
    users = pd.DataFrame({"userID": range(38), "preference": [f"pref {u}" for u in range(38)], "num_interactions": 5})
    users.to_csv(tmp_path / "user_preferences.csv", index=False)
    cfg = compose_cfg("llm=replay", f"llm.items_file={tmp_path / 'output_image2text.csv'}",
                      f"llm.users_file={tmp_path / 'user_preferences.csv'}")
    with caplog.at_level(logging.WARNING):
        d = describe.run(cfg.describe, llm_settings(cfg), tiny_data, _cache(cfg), cfg.dataset.display_name)
        r = reason.run(cfg.reason, llm_settings(cfg), tiny_data, _cache(cfg))
    assert describe.load_texts(d) == [f"img {i}" for i in range(30)]  # image_description, not description
    assert reason.load_texts(r) == [f"pref {u}" for u in range(38)] + ["", ""]
    assert r.manifest["counts"]["missing_ids"] == 2 and any("2 of 40 users" in m for m in caplog.messages)

    users.loc[5, "userID"] = 40
    users.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError) as ei:
        reason.run(cfg.reason, llm_settings(compose_cfg("llm=replay", f"llm.users_file={tmp_path / 'bad.csv'}")),
                   tiny_data, _cache(cfg))
    assert str(ei.value) == f"{tmp_path / 'bad.csv'}: column 'userID', line 7: user id 40 is not in the dataset (40 users)"

    users.loc[5, "userID"] = 4
    users.rename(columns={"preference": "pref_text"}).to_parquet(tmp_path / "u.parquet")
    with pytest.raises(DataError, match="duplicate user id 4"):
        reason.run(cfg.reason, llm_settings(compose_cfg("llm=replay", f"llm.users_file={tmp_path / 'u.parquet'}",
                                                        "llm.user_text_column=pref_text")), tiny_data, _cache(cfg))
    with pytest.raises(ConfigError, match="llm.users_file"):
        reason.run(cfg.reason, llm_settings(compose_cfg("llm=replay")), tiny_data, _cache(cfg))


# ---------------------------------------------------------------- the API key is never written
def test_api_key_never_reaches_a_file(compose_cfg, tiny_data, image_dir, tmp_path, monkeypatch):
    from mllmrec.pipeline import build_inputs

    monkeypatch.setenv("MY_LLM_KEY", SECRET)
    with StubServer(fail_first=1, fail_statuses=(500,)) as server:
        cfg = _openai(compose_cfg, server, "llm.api_key_env=MY_LLM_KEY", f"describe.image_dir={image_dir}")
        inputs = build_inputs(cfg, until="reason")
    assert {"describe", "reason"} <= set(inputs.artifacts)
    assert all(r["headers"].get("Authorization") == f"Bearer {SECRET}" for r in server.requests)
    manifest = json.loads((inputs.artifacts["reason"].path / "manifest.json").read_text())
    assert manifest["config"]["backend"] == "openai" and "MY_LLM_KEY" not in json.dumps(manifest)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_describe_shards_answer_disjoint_images_and_the_next_run_merges(compose_cfg, tiny_data, image_dir,
                                                                         fake_engine, tmp_path):
    """``stages.describe llm.num_shards=3 llm.shard=k`` (the SLURM array's jobs): each shard describes its
    share of the items that have an image, saves it and publishes nothing; the run without ``llm.shard``
    sends nothing again and publishes the unsharded run's artifact."""
    from mllmrec.stages import describe

    base = ("llm=vllm", f"describe.image_dir={image_dir}", "llm.chunk_size=4")

    def run(*over, cache):
        cfg = compose_cfg(*base, *over, f"paths.cache_dir={cache}")
        return describe.run(cfg.describe, llm_settings(cfg), tiny_data, _cache(cfg), cfg.dataset.display_name)

    reference = run(cache=tmp_path / "plain")
    (engine,) = fake_engine
    assert len(engine.answered) == 20
    shards = []
    for shard in range(3):
        with pytest.raises(runner.ShardDone, match=f"describe: shard {shard} of 3 is done"):
            run("llm.num_shards=3", f"llm.shard={shard}", cache=tmp_path / "sharded")
        shards.append(len(engine.answered) - 20 - sum(shards))
    assert shards == [7, 7, 6]  # the 20 items with an image, dealt round-robin; none sent twice
    assert not [p for p in (tmp_path / "sharded" / "tiny" / "describe").iterdir() if not p.name.startswith(".")]
    merged = run(cache=tmp_path / "sharded")
    assert len(engine.answered) == 40 and merged.manifest["counts"]["reused_saved_answers"] == 20
    assert merged.key == reference.key
    pd.testing.assert_frame_equal(pd.read_parquet(merged.file(describe.OUTPUT)),
                                  pd.read_parquet(reference.file(describe.OUTPUT)))
