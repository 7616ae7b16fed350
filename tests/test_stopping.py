"""Early stopping and best-checkpoint selection, on scripted validation sequences.

The callbacks come from ``conf/callbacks/default.yaml`` (what a user's run gets) and the fit/test
sequence from ``mllmrec.train``; only the model is scripted: its validation Recall@20 follows a
given list, and its weights record the epoch they were trained in, so the test metrics reveal
which checkpoint was loaded.
"""

from __future__ import annotations

import types

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mllmrec.config import CONF_DIR
from mllmrec.datamodule import BatchList
from mllmrec.metrics import EvalSpec
from mllmrec.models.base import RankingModule



class Scripted(RankingModule):
    """``script``: the validation value of every metric per epoch; ``per_metric``: other scripts for
    some metrics (by name, e.g. ``ndcg@20``)."""

    def __init__(self, script: list[float], per_metric: dict | None = None):
        super().__init__()
        self.per_metric = per_metric or {}
        self.save_hyperparameters({"lr": 1e-3, "weight_decay": 0.0})
        self.script = script
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("trained_in_epoch", torch.tensor(-1.0))  # saved with the checkpoint
        self.val_epochs: list[int] = []

    def batch_loss(self, users, pos, neg):
        self.trained_in_epoch.fill_(float(self.current_epoch))
        return (self.w ** 2).sum()

    def begin_evaluation(self):
        pass

    def evaluation_step(self, batch):
        pass

    def end_evaluation(self, prefix):
        if prefix == "val":
            self.val_epochs.append(int(self.current_epoch))
            values = {f"val/{m}": self.per_metric.get(m, self.script)[self.current_epoch] for m in self.eval_spec.names}
        else:
            values = {f"test/{m}": float(self.trained_in_epoch) for m in self.eval_spec.names}
        for k, v in values.items():
            self.log(k, v)
        return values


class OneBatch(pl.LightningDataModule):
    def train_dataloader(self):
        return BatchList([(torch.zeros(2, dtype=torch.long),) * 3])

    def val_dataloader(self):
        return BatchList([0])

    def test_dataloader(self):
        return BatchList([0])


def callbacks_from_conf(tmp_path, valid_metric: str | None = None) -> dict:
    conf = OmegaConf.load(CONF_DIR / "callbacks" / "default.yaml")
    conf.eval = OmegaConf.load(CONF_DIR / "eval" / "default.yaml")  # resolves monitor: val/${eval.valid_metric}
    if valid_metric:
        conf.eval.valid_metric = valid_metric
    conf.model_checkpoint.dirpath = str(tmp_path / "checkpoints")
    return {name: instantiate(conf[name]) for name in ("early_stopping", "model_checkpoint")}


def fit(script, tmp_path, max_epochs=200):
    model = Scripted(script)
    cbs = callbacks_from_conf(tmp_path)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=list(cbs.values()), logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=OneBatch())
    return model, trainer


@pytest.mark.parametrize("n_before", [1, 5])
def test_stops_after_exactly_21_non_improving_epochs(tmp_path, n_before):
    """MMRec: a counter of non-improving epochs (a tie does not improve); stop when it exceeds 20."""
    # rising for n_before epochs, a plateau that ties the best, a fall, one new best (resets the
    # counter after 10 non-improving epochs), then nothing better ever again
    best = 0.1 * n_before
    script = [0.1 * (e + 1) for e in range(n_before)] + [best] * 4 + [best - 0.05] * 6 + [best + 0.01]
    script += [best] * 3 + [best - 0.02] * 500
    model, trainer = fit(script, tmp_path)
    last_best = n_before + 10  # index of the last improvement
    assert script[last_best] == max(script) and script.index(max(script)) == last_best
    assert model.val_epochs == list(range(last_best + 21 + 1))  # 21 non-improving epochs after it
    assert trainer.should_stop and model.best["epoch"] == last_best


def test_the_tested_weights_are_the_best_validation_epochs(tmp_path):
    """A scripted run whose last epochs are worse: test metrics come from the best epoch's weights."""
    from mllmrec import train as train_mod

    script = [0.1, 0.3, 0.5, 0.4, 0.5, 0.2]  # best at epoch 2 (epoch 4 only ties it), last is worst
    model = Scripted(script)
    callbacks = list(callbacks_from_conf(tmp_path).values())
    cfg = OmegaConf.create({
        "trainer": {"_target_": "pytorch_lightning.Trainer", "max_epochs": len(script), "accelerator": "cpu",
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path)},
        "resume": "never",
        "dataset": {"name": "scripted"},
    })
    inputs = types.SimpleNamespace(artifacts={})
    metrics = train_mod._fit_and_test(cfg, inputs, OneBatch(), model, callbacks, [], tmp_path, "fp")
    assert metrics["epochs"] == len(script)
    assert metrics["best_epoch"] == 2 and metrics["val/recall@20"] == pytest.approx(0.5)
    assert metrics["test/recall@20"] == 2.0  # the weights trained in epoch 2, not the last (5)
    assert float(model.trained_in_epoch) == 2.0


def test_eval_valid_metric_drives_stopping_best_epoch_and_the_tested_checkpoint(tmp_path):
    """eval.valid_metric=ndcg@20 'eval.topk=[5,20]': early stopping, the best-epoch record and the
    checkpoint tested follow val/ndcg@20, whose best (epoch 3) is not Recall@20's (a late rise at 30)."""
    from mllmrec import train as train_mod

    ndcg = [0.1, 0.2, 0.3, 0.6] + [0.5] * 60
    recall = [0.1] * 30 + [0.9] * 34  # would keep training to epoch 30 and pick it, if it selected
    model = Scripted(recall, per_metric={"ndcg@20": ndcg, "ndcg@5": ndcg})
    model.eval_spec = EvalSpec.from_config({"valid_metric": "ndcg@20", "topk": [5, 20]})
    callbacks = list(callbacks_from_conf(tmp_path, "ndcg@20").values())
    cfg = OmegaConf.create({
        "trainer": {"_target_": "pytorch_lightning.Trainer", "max_epochs": len(ndcg), "accelerator": "cpu",
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path)},
        "resume": "never", "dataset": {"name": "scripted"},
    })
    metrics = train_mod._fit_and_test(cfg, types.SimpleNamespace(artifacts={}), OneBatch(), model, callbacks, [],
                                      tmp_path, "fp")
    assert model.val_epochs == list(range(3 + 21 + 1))  # stopped 21 epochs after ndcg's best, before recall's rise
    assert metrics["stopped_early"] is True  # recorded before testing (restoring the best checkpoint resets it)
    assert metrics["best_epoch"] == 3 and metrics["val/ndcg@20"] == pytest.approx(0.6)
    assert metrics["test/ndcg@20"] == 3.0  # the weights trained in ndcg's best epoch
    assert {k for k in metrics if k.startswith("test/")} == {"test/recall@5", "test/recall@20", "test/ndcg@5",
                                                              "test/ndcg@20"}


@pytest.mark.parametrize("node,key", [({"valid_metric": "recall@10", "topk": [5, 20]}, "eval.valid_metric"),
                                      ({"valid_metric": "auc"}, "eval.valid_metric"),
                                      ({"topk": [0, 20]}, "eval.topk"), ({"topk": "twenty"}, "eval.topk")])
def test_a_metric_that_is_not_computed_is_a_one_line_error(node, key):
    from mllmrec.errors import ConfigError

    with pytest.raises(ConfigError, match=key) as err:
        EvalSpec.from_config(node)
    assert "\n" not in str(err.value)


def test_defaults_are_the_official_codes(compose_cfg):
    """model.init: PyTorch's Linear init (the official code's); early stopping: MMRec's stopping_step 20."""
    from mllmrec.models.mllmrec import Tower

    cfg = compose_cfg()
    assert cfg.model.init == "default"
    assert cfg.callbacks.early_stopping.stopping_step == 20
    torch.manual_seed(0)
    default = Tower(384, 256, 64)
    torch.manual_seed(0)
    reference = torch.nn.Linear(384, 256)  # what nn.Linear does by itself: bias ~ U(+-1/sqrt(384))
    torch.testing.assert_close(default.fc1.weight, reference.weight)
    torch.testing.assert_close(default.fc1.bias, reference.bias)
    xavier = Tower(384, 256, 64, init="xavier")
    assert float(xavier.fc1.bias.abs().max()) == 0.0 and float(xavier.fc1.weight.abs().max()) <= (6 / 640) ** 0.5


@pytest.mark.parametrize("kwargs,key", [({"stopping_step": -1}, "stopping_step"), ({"patience": 20}, "patience"),
                                        ({"min_delta": 0.01}, "min_delta")])
def test_early_stopping_refuses_settings_that_break_mmrecs_rule(kwargs, key):
    from mllmrec.callbacks import MMRecEarlyStopping
    from mllmrec.errors import ConfigError

    with pytest.raises(ConfigError, match=f"callbacks.early_stopping.{key}"):
        MMRecEarlyStopping(monitor="val/recall@20", **kwargs)
