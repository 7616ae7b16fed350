"""The describe/reason stages end to end: leak-free behaviour lists, the paper's opt-in protocol,
descriptions flowing into Prompt2, prompt fitting, and the command line (missing vLLM, kill -9 and
resume, the API key kept out of every file of a Hydra run)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import llm_settings, run_module, tiny_overrides
from llm_fakes import StubServer, sent_prompts
from mllmrec.cache import ArtifactCache
from mllmrec.data import TRAIN
from mllmrec.llm import backends
from mllmrec.texts import LEAK_WARNING

TESTS = Path(__file__).resolve().parent
SECRET = "sk-cli-secret-0123456789abcdef"


def test_default_prompts_hold_no_validation_or_test_item(compose_cfg, tiny_data, fake_engine):
    from mllmrec.stages import reason

    cfg = compose_cfg("llm=vllm")
    assert cfg.reason.history == "train"
    art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, ArtifactCache(cfg.paths.cache_dir, "tiny"))
    titles = tiny_data.item_field("title")
    train_hist = tiny_data.history("train")
    sent = sent_prompts(fake_engine)
    assert len(sent) == tiny_data.n_users
    checked = 0
    for u, items in enumerate(train_hist):
        (prompt,) = [p for p in sent if all(titles[i] in p for i in items)
                     and sum(t in p for t in titles) == len(items)]
        held = tiny_data.items[(tiny_data.users == u) & (tiny_data.split != TRAIN)]
        for i in held:
            if i not in items:
                assert titles[i] not in prompt, (u, titles[i])
                checked += 1
        # the list is D^m_i in history order, oldest first
        positions = [prompt.index(titles[i]) for i in items]
        assert positions == sorted(positions)
    assert checked == 2 * tiny_data.n_users
    assert art.manifest["counts"]["history"] == "train" and art.manifest["config"]["history"] == "train"


def test_history_all_includes_heldout_items_and_warns(compose_cfg, tiny_data, fake_engine, caplog):
    from mllmrec.stages import reason

    cfg = compose_cfg("llm=vllm", "reason.history=all")
    with caplog.at_level(logging.WARNING):
        art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, ArtifactCache(cfg.paths.cache_dir, "tiny"))
    assert LEAK_WARNING in caplog.messages
    titles = tiny_data.item_field("title")
    sent = sent_prompts(fake_engine)
    for u, items in enumerate(tiny_data.history("all")):
        held = tiny_data.items[(tiny_data.users == u) & (tiny_data.split != TRAIN)]
        assert len(held) == 2
        assert any(all(titles[i] in p for i in items) for p in sent), u  # held-out titles are in the prompt
    leak_free = reason.run(compose_cfg("llm=vllm").reason, llm_settings(cfg), tiny_data,
                           ArtifactCache(cfg.paths.cache_dir, "tiny"))
    assert leak_free.key != art.key

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a cached leaky artifact still warns
        again = reason.run(cfg.reason, llm_settings(cfg), tiny_data, ArtifactCache(cfg.paths.cache_dir, "tiny"))
    assert again.reused and LEAK_WARNING in caplog.messages


def test_image_descriptions_flow_into_prompt2_and_the_item_texts(compose_cfg, tmp_path, fake_engine):
    from PIL import Image

    from mllmrec.pipeline import build_inputs
    from mllmrec.texts import item_texts
    from mllmrec.stages import describe

    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(images / "7.jpg")
    cfg = compose_cfg("llm=vllm", f"describe.image_dir={images}")
    inputs = build_inputs(cfg, until="reason")
    assert set(inputs.artifacts) == {"describe", "reason"}
    descriptions = describe.load_texts(inputs.artifacts["describe"])
    assert descriptions[7].startswith("A sturdy item") and sum(bool(d) for d in descriptions) == 1
    d_m = item_texts(inputs.data, descriptions)[7]
    assert d_m.endswith(descriptions[7])
    users_of_7 = {u for u, items in enumerate(inputs.data.history("train")) if 7 in items}
    reason_prompts = [p for p in sent_prompts(fake_engine) if p.startswith("Please reason")]
    assert users_of_7 and sum(d_m in p for p in reason_prompts) == len(users_of_7)
    assert len(fake_engine) == 1 and not backends._ENGINES  # one engine for both stages, released after reason

    only_describe = build_inputs(cfg, until="describe")
    assert set(only_describe.artifacts) == {"describe"} and only_describe.artifacts["describe"].reused


def test_long_lists_are_fitted_and_counted(compose_cfg, tiny_data, fake_engine):
    from mllmrec.stages import reason

    cfg = compose_cfg("llm=vllm", "reason.max_prompt_tokens=90", "reason.min_item_chars=40", "reason.tokenizer=chars")
    art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, ArtifactCache(cfg.paths.cache_dir, "tiny"))
    counts = art.manifest["counts"]
    assert counts["prompts_fitted"] > 0 and counts["items_dropped"] > 0 and counts["items_shortened"] > 0
    assert counts["token_counter"] == "chars/4"
    titles = tiny_data.item_field("title")
    for prompt in sent_prompts(fake_engine):
        assert len(prompt) <= 90 * 4
    # a user whose list was cut keeps the NEWEST item
    hist = tiny_data.history("train")
    newest = {titles[items[-1]] for items in hist}
    assert all(any(t[:20] in p for t in newest) for p in sent_prompts(fake_engine))


# ---------------------------------------------------------------- command line
def _cli_env(monkeypatch, **extra):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # run_module prepends the repo; llm_fakes is importable
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_cli_without_vllm_exits_with_one_line(tiny_dir, tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    proc = run_module("stages.reason", *tiny_overrides(tmp_path, "llm=vllm", data_dir=tiny_dir, run=tmp_path / "run"),
                      cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pip install 'mllmrec[vllm]'" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_kill_9_then_resume(tiny_dir, tmp_path, monkeypatch):
    log = tmp_path / "answered.jsonl"
    _cli_env(monkeypatch, FAKE_LLM_LOG=str(log), FAKE_LLM_KILL_AFTER="2")
    args = tiny_overrides(tmp_path / "out", "llm=vllm", "llm.engine_factory=llm_fakes:FakeLLM", "llm.chunk_size=7",
                          data_dir=tiny_dir)
    killed = run_module("stages.reason", *args, f"hydra.run.dir={tmp_path}/run1", cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    first = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(first) == 14
    reason_dir = tmp_path / "out" / "cache" / "tiny" / "reason"
    assert not [p for p in reason_dir.iterdir() if not p.name.startswith(".")]  # nothing published

    monkeypatch.delenv("FAKE_LLM_KILL_AFTER")
    done = run_module("stages.reason", *args, f"hydra.run.dir={tmp_path}/run2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reason:" in done.stdout
    second = [json.loads(x) for x in log.read_text().splitlines()][len(first):]
    assert len(second) == 40 - 14 and not set(first) & set(second)
    (art,) = [p for p in reason_dir.iterdir() if not p.name.startswith(".")]
    df = pd.read_parquet(art / "users.parquet")
    assert df["userID"].tolist() == list(range(40)) and (df["text"] != "").all()


@pytest.mark.slow
def test_cli_openai_keeps_the_key_out_of_every_file(tiny_dir, tmp_path, monkeypatch):
    _cli_env(monkeypatch, OPENAI_API_KEY=SECRET)
    with StubServer(fail_first=1) as server:
        proc = run_module("stages.reason", *tiny_overrides(
            tmp_path / "out", "llm=openai", f"llm.base_url={server.url}/v1", "llm.model=stub", "llm.backoff.initial=0.01",
            data_dir=tiny_dir, run=tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(server.ok_requests()) == 40
    assert all(r["headers"].get("Authorization") == f"Bearer {SECRET}" for r in server.requests)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".log") for p in files) and any(p.name == "manifest.json" for p in files)
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in proc.stdout + proc.stderr
    assert os.environ["OPENAI_API_KEY"] == SECRET
