"""The static-shape training step (model.cuda_graphs, mllmrec/static_step.py) on CPU, where it runs
eagerly: padded and weighted, it gives the normal step's loss and gradients, and inside Lightning
(manual optimisation) it trains like the normal step, counts global steps the same way and resumes
from a checkpoint. The captured (CUDA) version is checked in tests/test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from model_inputs import inputs_of

from mllmrec.datamodule import RecDataModule
from mllmrec.errors import ConfigError
from mllmrec.models.mllmrec import MLLMRecModule
from mllmrec.models.static_step import pad_batch, resolve_mode, static_loss


def make_model(n_users=40, n_items=30, seed=0, **kw) -> MLLMRecModule:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    features = {"user_features": torch.randn(n_users, 12, generator=g), "item_features": torch.randn(n_items, 12, generator=g)}
    return MLLMRecModule(inputs_of(shape=(n_users, n_items), **features), d=8, d1=16, **kw)


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def triplets(n, seed=1, n_users=40, n_items=30):
    g = torch.Generator().manual_seed(seed)
    # few users/items so that rows repeat (the normal step de-duplicates them, the static one not)
    return (torch.randint(n_users, (n,), generator=g), torch.randint(n_items, (n,), generator=g),
            torch.randint(n_items, (n,), generator=g))


@pytest.mark.parametrize("n, size", [(64, 64), (37, 64), (1, 64)])
def test_static_step_gives_the_normal_loss_and_gradients(n, size):
    model = make_model()
    users, pos, neg = triplets(n)
    loss_ref = model.batch_loss(users, pos, neg)  # the normal step (unique rows, mean)
    g_ref = grads(model, loss_ref)
    padded = pad_batch(users, pos, neg, size)
    assert all(t.shape == (size,) for t in padded)
    loss = static_loss(model, *padded)
    g = grads(model, loss)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_padding_rows_weigh_nothing_and_real_rows_average():
    users, pos, neg = triplets(5)
    u, p, n, w = pad_batch(users, pos, neg, 8)
    assert torch.equal(u[:5], users) and torch.equal(p[:5], pos) and torch.equal(n[:5], neg)
    np.testing.assert_allclose(w.numpy(), [0.2] * 5 + [0.0] * 3)
    with pytest.raises(ValueError, match="static batch size"):
        pad_batch(*triplets(9), 8)


def test_mode_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode(False, cpu) == (False, False)
    assert resolve_mode("auto", cpu) == (False, False)  # CPU runs stay on the normal step
    assert resolve_mode("auto", cuda) == (True, True)
    assert resolve_mode("auto", cuda, ui_layers=2) == (False, False)
    assert resolve_mode("true", cuda) == (True, True)
    assert resolve_mode(True, cpu) == (True, False)  # eager static step
    with pytest.raises(ConfigError, match="model.cuda_graphs"):
        resolve_mode("sometimes", cpu)
    with pytest.raises(ConfigError, match="ui_layers"):
        resolve_mode(True, cuda, ui_layers=2)


def fit(tiny_data, tmp_path, cuda_graphs, epochs, ckpt_path=None, accelerator="cpu"):
    """``epochs`` epochs of 4 steps (3 full batches of 64 and one of 18, padded) on the tiny data."""
    pl.seed_everything(3, verbose=False)
    model = make_model(tiny_data.n_users, tiny_data.n_items, cuda_graphs=cuda_graphs)
    dm = RecDataModule(batch_size=64, eval_batch_size=16, seed=3).attach(tiny_data)  # 210 rows: 3 x 64 + 18
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def test_static_step_inside_lightning_trains_like_the_normal_step_and_resumes(tiny_data, tmp_path):
    normal, t_normal = fit(tiny_data, tmp_path / "normal", False, 3)
    static, t_static = fit(tiny_data, tmp_path / "static", True, 3)
    assert not static.automatic_optimization and normal.automatic_optimization
    assert t_static.global_step == t_normal.global_step == 3 * 4  # one optimizer step per batch
    assert len(t_static.train_dataloader) == 1  # the static step takes the epoch in one Lightning batch
    torch.testing.assert_close(t_static.callback_metrics["train/loss"], t_normal.callback_metrics["train/loss"],
                               rtol=1e-5, atol=1e-7)  # the same epoch mean of the BPR loss
    for (name, p_ref), (_, p) in zip(normal.named_parameters(), static.named_parameters()):
        if name == "item_tower.fc2.bias":  # y_ui - y_uj does not depend on it: its gradient is rounding
            continue                       # noise, which Adam scales up to lr-sized steps in either path
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-6, msg=name)
    assert static.best["epoch"] == normal.best["epoch"]
    assert static.best["val/recall@20"] == pytest.approx(normal.best["val/recall@20"], abs=1e-9)

    # stop after 2 epochs, resume from last.ckpt for the third: the same weights as straight through
    fit(tiny_data, tmp_path / "part", True, 2)
    resumed, t_resumed = fit(tiny_data, tmp_path / "part", True, 3, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert t_resumed.global_step == 12
    for (name, p_ref), (_, p) in zip(static.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("override, key", [("model.cuda_graphs=sometimes", "model.cuda_graphs"),
                                           ("launcher.gpus_per_node=-1", "launcher.gpus_per_node")])
def test_bad_switches_are_refused_up_front(compose_cfg, override, key):
    from mllmrec.config import validate

    validate(compose_cfg())  # the defaults pass
    with pytest.raises(ConfigError, match=f"config '{key}'"):
        validate(compose_cfg(override))
