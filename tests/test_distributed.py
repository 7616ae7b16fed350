"""One training job on several processes (mllmrec/distributed.py, docs/distributed.md).

- the shares: each rank's contiguous, equal part of the epoch's permutation; the evaluated users
  split in parts that cover them all; refusals in one line before training (in process, cheap);
- a real 2-process gloo DDP run of LightGCN on the tiny fixture (slow: it starts two Python
  processes), then the same run dir resumed to more epochs: the ranks trained on disjoint shares that
  together are the epoch's global permutation, the logged metrics equal a 1-process evaluation of
  the best checkpoint exactly, rank 0 alone wrote metrics.json, Lightning warned about no sync_dist,
  and both ranks resumed from the same last.ckpt with the shares of the later epochs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from conftest import run_module, tiny_overrides
from mllmrec.distributed import DDP_FIND_UNUSED, check_supported, strategy_override, triplet_share, user_share
from mllmrec.errors import ConfigError
from model_inputs import inputs_of

SEED = 999


# ---- the shares (no process started) -----------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 210, 4097])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_triplet_shares_are_equal_disjoint_and_leave_out_fewer_than_world(n, world):
    shares = [triplet_share(n, r, world) for r in range(world)]
    sizes = {s.stop - s.start for s in shares}
    assert sizes == {n // world}  # equal: the same number of steps and batch sizes on every rank
    rows = np.concatenate([np.arange(n)[s] for s in shares])
    assert len(np.unique(rows)) == len(rows)  # disjoint
    np.testing.assert_array_equal(rows, np.arange(n - n % world))  # in order; only the last n mod world left out
    if world == 1:
        assert shares[0] == slice(0, n)  # one process: the whole epoch, as before


@pytest.mark.parametrize("world", [1, 2, 3])
def test_user_shares_cover_every_user_once(world):
    users = np.array([0, 2, 3, 5, 8, 9, 11])
    parts = [user_share(users, r, world) for r in range(world)]
    np.testing.assert_array_equal(np.concatenate(parts), users)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ConfigError, match="cannot be split over 8 processes"):
        user_share(users, 0, 8)


# ---- refusals before training (a Trainer is built, nothing is launched) ----------------------------
def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, **kwargs)


def _mllmrec(cuda_graphs):
    from mllmrec.models.mllmrec import MLLMRecModule

    rng = np.random.default_rng(0)
    train = (rng.random((6, 5)) < 0.5).astype(np.float32)
    inputs = inputs_of(train, user_features=rng.random((6, 8), dtype=np.float32),
                       item_features=rng.random((5, 8), dtype=np.float32))
    return MLLMRecModule(inputs, d=4, d1=8, cuda_graphs=cuda_graphs)


def test_cuda_graph_step_refuses_several_processes_in_one_line():
    with pytest.raises(ConfigError) as err:
        check_supported(_trainer(devices=2, strategy="ddp"), _mllmrec("true"))
    assert str(err.value).startswith("config 'trainer.strategy': MLLMRecModule cannot train on 2 processes: "
                                     "model.cuda_graphs=true")
    assert "\n" not in str(err.value)
    check_supported(_trainer(devices=2, strategy="ddp"), _mllmrec("auto"))  # auto: the normal step, accepted
    check_supported(_trainer(devices=1), _mllmrec("true"))  # one process: nothing to refuse


def test_strategies_that_keep_state_in_workers_refuse():
    with pytest.raises(ConfigError, match="ddp_spawn / ddp_fork"):
        check_supported(_trainer(devices=2, strategy="ddp_spawn"), _mllmrec(False))


def test_a_model_with_unused_parameters_gets_find_unused_parameters():
    from omegaconf import OmegaConf

    model = _mllmrec(False)
    model.ddp_find_unused_parameters = True  # as LATTICE declares
    ddp = strategy_override(OmegaConf.create({"strategy": "ddp"}), model)["strategy"]
    assert ddp._ddp_kwargs == {"find_unused_parameters": True, "broadcast_buffers": False}
    assert strategy_override(OmegaConf.create({"strategy": "auto"}), model) == {}
    check_supported(_trainer(devices=2, strategy=ddp), model)
    check_supported(_trainer(devices=2, strategy=DDP_FIND_UNUSED), model)
    with pytest.raises(ConfigError, match="find_unused_parameters"):
        check_supported(_trainer(devices=2, strategy=pl.strategies.DDPStrategy()), model)


# ---- a real 2-process run -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_runs(tiny_dir, tmp_path_factory):
    """LightGCN on 2 gloo processes for 2 epochs (7 steps of 2 x 16 triplets each), then the same run dir
    resumed to 4 epochs."""
    out = tmp_path_factory.mktemp("ddp")
    mp = pytest.MonkeyPatch()
    tests = str(Path(__file__).resolve().parent)  # ranks import ddp_helpers
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    mp.setenv("OMP_NUM_THREADS", "1")
    try:
        procs, trained = [], None
        for epochs, record in ((2, "first"), (4, "resumed")):
            args = tiny_overrides(out, "model=lightgcn", "logger=none", "trainer.enable_progress_bar=false",
                                  f"trainer.max_epochs={epochs}", "trainer.devices=2", "trainer.strategy=ddp",
                                  "data.batch_size=16",
                                  "+callbacks.record._target_=ddp_helpers.RecordTriplets",
                                  f"+callbacks.record.out={out / 'triplets'}", data_dir=tiny_dir,
                                  cache=out / "cache", run=out / "run")
            proc = run_module("mllmrec.train", *args, cwd=out, timeout=600)
            assert proc.returncode == 0, f"{record} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            procs.append(proc)
            if trained is None:  # Lightning 2.6 updates last.ckpt only in an epoch that saved the best one
                last = torch.load(out / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                trained = int(last["epoch"]) + 1
    finally:
        mp.undo()
    return out, procs, trained


def _epoch_rows(tiny_data, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, positives) of the 1-process epoch ``epoch``: the global permutation, in order."""
    from mllmrec.datamodule import RecDataModule, TripletEpochs

    dm = RecDataModule(batch_size=16, seed=SEED).attach(tiny_data)
    dm.setup()
    epochs = TripletEpochs(dm)
    epochs._epoch = epoch
    batches = list(epochs)
    return torch.cat([b[0] for b in batches]).numpy(), torch.cat([b[1] for b in batches]).numpy()


@pytest.mark.slow
def test_ranks_train_on_disjoint_shares_of_the_global_permutation(ddp_runs, tiny_data):
    out, _, trained = ddp_runs
    for first, epochs in ((0, (0, 1)), (trained, range(trained, 4))):  # the first run, then the resumed one
        ranks = [np.load(out / "triplets" / f"rank{r}-from{first}.npy") for r in range(2)]
        assert [sorted(set(r[:, 0])) for r in ranks] == [list(epochs)] * 2
        for epoch in epochs:
            mine = [r[r[:, 0] == epoch] for r in ranks]
            assert len(mine[0]) == len(mine[1]) > 0  # equal shares
            pairs = [set(map(tuple, m[:, 1:3].tolist())) for m in mine]
            assert not pairs[0] & pairs[1]  # disjoint (a training pair occurs once per epoch)
            users, pos = _epoch_rows(tiny_data, epoch)
            n = len(users) - len(users) % 2
            # rank 0 then rank 1: the epoch's global permutation, that of a 1-process run
            np.testing.assert_array_equal(np.concatenate([m[:, 1] for m in mine]), users[:n])
            np.testing.assert_array_equal(np.concatenate([m[:, 2] for m in mine]), pos[:n])
            for m in mine:  # negatives: no training item of the row's user
                assert not set(map(tuple, m[:, [1, 3]].tolist())) & set(zip(*tiny_data.pairs(0)))


@pytest.mark.slow
def test_metrics_are_the_exact_one_process_evaluation_of_the_best_checkpoint(ddp_runs):
    from mllmrec.datamodule import RecDataModule
    from mllmrec.runs import load_run

    out, _, _ = ddp_runs
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["processes"] == 2 and metrics["epochs"] == 4
    run = load_run(out / "run")
    assert Path(metrics["checkpoint"]) == run.checkpoint
    dm = RecDataModule(seed=SEED).attach(run.inputs.data)
    dm.setup()  # no trainer: one process, every user
    for split, prefix in (("test", "test/"), ("valid", "val/")):
        alone = run.model.evaluate(dm.eval_batches[split])
        for name, value in alone.items():
            # logged as float32 (RankingEvaluation.end_evaluation): equal to the last bit
            assert metrics[prefix + name] == float(np.float32(value)), (prefix + name, metrics[prefix + name], value)


@pytest.mark.slow
def test_rank_zero_alone_writes_and_no_sync_dist_warning(ddp_runs):
    out, procs, _ = ddp_runs
    for proc in procs:
        text = proc.stdout + proc.stderr
        assert "sync_dist" not in text
        assert "rank 1 of 2 done; rank 0 writes" in text
        assert "trains on rows [0, 105) of each epoch's permutation of the 210 triplets" in text
        assert "trains on rows [105, 210)" in text
    rank1 = (out / "run" / "train_ddp_process_1.log").read_text()
    assert "rank 1 of 2 done" in rank1 and "best epoch" not in rank1  # rank 0 alone wrote and logged the run
    main_log = (out / "run" / "train.log").read_text()
    assert main_log.count("best epoch") == 2  # rank 0: one line per run
    assert sorted(p.name for p in (out / "run").glob("metrics*.json")) == ["metrics.json"]


@pytest.mark.slow
def test_both_ranks_resume_from_the_same_last_checkpoint(ddp_runs):
    out, procs, trained = ddp_runs
    ckpt = out / "run" / "checkpoints" / "last.ckpt"
    rank1 = (out / "run" / "train_ddp_process_1.log").read_text()
    assert f"resuming from {ckpt} ({trained} epochs trained" in (out / "run" / "train.log").read_text()
    assert f"resuming from {ckpt} ({trained} epochs trained" in rank1
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(ckpt) and metrics["epochs"] == 4


def test_srun_tasks_of_one_step_share_a_run_dir_stamp(monkeypatch):
    from mllmrec.config import run_stamp

    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert run_stamp("2026-01-01_00-00-00-000001") == "2026-01-01_00-00-00-000001"  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert run_stamp("t") == "t"  # one task (a submitit job of a grid): its own start time
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert run_stamp("t") == "slurm-42.0"
