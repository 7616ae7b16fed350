"""Bad input and interruptions of the LLM stages, with the fake engine and the stub server (fast):
an unreachable server, a model folder that is not a model, a shard index out of range, a SLURM
time limit (SIGUSR2 mid-chunk, a chunk that never finishes): one line each, nothing saved lost."""

from __future__ import annotations

import json
import os
import signal
import time

import pandas as pd
import pytest

from conftest import llm_settings
from llm_fakes import FakeLLM, StubServer, sent_prompts
from mllmrec import slurm_launch
from mllmrec.cache import ArtifactCache
from mllmrec.errors import ConfigError, MLLMRecError
from mllmrec.llm import backends, runner, serve
from mllmrec.llm.backends import Request, Result


def _cache(cfg):
    return ArtifactCache.from_config(cfg)


def _parts(cache) -> dict:
    """{part file name: bytes} of the reason stage's work folders."""
    return {p.name: p.read_bytes() for p in (cache.root / "tiny" / "reason").glob(".work-*/part-*.parquet")}


def test_an_unreachable_server_is_one_line_and_keeps_the_saved_answers(compose_cfg, tiny_data):
    from mllmrec.stages import reason

    with StubServer() as server:
        cfg = compose_cfg("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=stub-model", "llm.limit=8",
                          "llm.chunk_size=4")
        cache = _cache(cfg)
        reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
    saved = _parts(cache)
    assert len(saved) == 2
    url = f"http://127.0.0.1:{serve.free_port()}/v1"  # nothing listens there
    cfg = compose_cfg("llm=openai", f"llm.base_url={url}", "llm.model=stub-model", "llm.max_retries=1",
                      "llm.backoff.initial=0.01", "llm.backoff.max=0.02", "llm.chunk_size=4")
    with pytest.raises(MLLMRecError) as err:
        reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
    msg = str(err.value)
    assert "\n" not in msg and "gave up after 2 attempts: ConnectError" in msg and "no server answers at llm.base_url" in msg
    assert _parts(cache) == saved  # the 8 answers saved before are all there, untouched


def test_a_model_folder_that_is_not_a_model_is_one_line_before_the_engine_loads(compose_cfg, tiny_data, tmp_path,
                                                                               monkeypatch):
    from mllmrec.stages import reason

    monkeypatch.setattr(backends, "ENGINE_FACTORY", FakeLLM)
    FakeLLM.instances = []
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("weights go here")
    cases = [(folder, f"config 'llm.model': {folder} is not a model folder: it has no config.json (it holds: README.md)"),
             (tmp_path / "missing", f"config 'llm.model': {tmp_path / 'missing'}: no such folder")]
    for model, words in cases:
        cfg = compose_cfg("llm=vllm", f"llm.model={model}", "llm.limit=4")
        with pytest.raises(ConfigError) as err:
            reason.run(cfg.reason, llm_settings(cfg), tiny_data, _cache(cfg))
        assert str(err.value).startswith(words) and "\n" not in str(err.value)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json but no weights"):
        backends.check_model_folder(str(folder))
    assert FakeLLM.instances == []  # no engine was ever made
    backends.check_model_folder("google/gemma-3-27b-it")  # a hub name is vLLM's to resolve


@pytest.mark.slow
def test_a_shard_index_out_of_range_is_one_line_before_any_work(tmp_path):
    from conftest import run_module, tiny_overrides

    out = tmp_path / "out"
    proc = run_module("stages.reason", *tiny_overrides(out, "llm=vllm", "llm.num_shards=2", "llm.shard=2",
                                                       cache=out / "cache", run=out / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: config 'llm.shard': must be in 0..1 (llm.num_shards=2), got 2"
    assert not (out / "cache").exists()  # nothing done, nothing written


class SignalMidChunk(FakeLLM):
    """A fake engine that sends SIGUSR2 to its own process while it answers its first chunk
    (SLURM's warning before the time limit arrives during generation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SignalMidChunk.blocked_at_load = signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def chat(self, messages, params, use_tqdm=False):
        if not getattr(SignalMidChunk, "sent", False):
            SignalMidChunk.sent = True
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)  # the handler runs here, mid-chunk
        return super().chat(messages, params, use_tqdm)


def test_sigusr2_mid_chunk_is_held_until_the_chunk_is_saved_then_the_resume_sends_only_the_rest(
        compose_cfg, tiny_data, monkeypatch):
    """As in a submitit job: its handler requeues and exits; here it records when it ran."""
    from mllmrec.stages import reason

    calls = []

    def job_handler(signum, frame):  # submitit's: requeue, then sys.exit(-1)
        calls.append(len(_parts(cache)))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, job_handler)
    try:
        backends.release_engines()
        FakeLLM.instances = []
        SignalMidChunk.sent = False
        monkeypatch.setattr(backends, "ENGINE_FACTORY", SignalMidChunk)
        cfg = compose_cfg("llm=vllm", "llm.chunk_size=6")
        cache = _cache(cfg)
        with pytest.raises(SystemExit):
            reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
        assert calls == [1]  # handed over once, after the chunk in flight was saved
        # the engine (and the processes it starts) was made with SIGUSR2 blocked; this process unblocked it after
        assert SignalMidChunk.blocked_at_load and signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.getsignal(signal.SIGUSR2) is job_handler  # the job's handler is back
        first = sent_prompts(FakeLLM.instances)
        assert len(first) == 6
        backends.release_engines()
        FakeLLM.instances = []
        monkeypatch.setattr(backends, "ENGINE_FACTORY", FakeLLM)
        art = reason.run(cfg.reason, llm_settings(cfg), tiny_data, cache)
        second = sent_prompts(FakeLLM.instances)
        assert len(second) == tiny_data.n_users - 6 and not set(first) & set(second)  # nothing generated twice
        assert art.manifest["counts"]["reused_saved_answers"] == 6
    finally:
        signal.signal(signal.SIGUSR2, previous)
        backends.release_engines()
        FakeLLM.instances = []


def test_without_a_job_handler_sigusr2_is_not_touched(tmp_path):
    """Outside a submitit job (SIGUSR2 at its default), the runner installs no handler."""
    store = runner.WorkStore(tmp_path / ".work-x")
    seen = []

    class Backend:
        def generate(self, reqs):
            seen.append(signal.getsignal(signal.SIGUSR2))
            return [Result(r.id, "x", "stop", 1, 1) for r in reqs]

    runner._answer("reason", store, {}, [Request(0, "a")], Backend, 1, None, done=0)
    assert seen == [signal.SIG_DFL]


def test_a_chunk_the_time_limit_cut_is_named_with_what_remains(tmp_path, monkeypatch):
    """The job was killed while a chunk was generated (the time limit too short for one chunk):
    the launcher's line for it says how many answers are saved, how many remain, and what to change."""
    monkeypatch.setattr(runner, "progress_file", lambda stage: tmp_path / f"llm-{stage}-progress.json")
    store = runner.WorkStore(tmp_path / ".work-x")
    reqs = [Request(i, f"prompt {i}") for i in range(6)]

    class DiesOnSecondChunk:
        calls = 0

        def generate(self, part):
            DiesOnSecondChunk.calls += 1
            if DiesOnSecondChunk.calls == 2:
                raise KeyboardInterrupt  # stands for SIGKILL at the time limit: no Python code runs after it
            return [Result(r.id, "x", "stop", 1, 1) for r in part]

    selection = runner.Selection(num_shards=2, shard=1)
    with pytest.raises(KeyboardInterrupt):
        runner._answer("reason", store, {}, reqs, DiesOnSecondChunk, 4, None, done=2, selection=selection)
    progress = json.loads((tmp_path / "llm-reason-progress.json").read_text())
    assert progress["saved"] == 6 and progress["requests"] == 8 and progress["state"] == "generating"
    line = slurm_launch.llm_left(tmp_path)
    assert line.startswith("; reason shard 1 of 2: 6 of 8 answers saved, 2 remain (a chunk of 2 requests started at ")
    assert "lower llm.chunk_size=4 or raise hydra.launcher.timeout_min" in line and "\n" not in line
    assert len(store.load()) == 4  # the first chunk is saved
    assert pd.read_parquet(next(store.folder.glob("part-*.parquet"))).source.tolist() == ["shard 1 of 2, pid %d" % os.getpid()] * 4
    progress["saved"] = 8
    (tmp_path / "llm-reason-progress.json").write_text(json.dumps(progress))
    assert slurm_launch.llm_left(tmp_path) == ""  # a shard with everything saved leaves nothing to name
    progress.update(saved=2, state="loading the engine")
    (tmp_path / "llm-reason-progress.json").write_text(json.dumps(progress))
    assert "ended while the engine was loading" in slurm_launch.llm_left(tmp_path)
