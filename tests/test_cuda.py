"""The CUDA code paths, checked against the CPU ones. Skipped where no GPU is present (CI).

Run on a GPU machine with ``pytest tests/test_cuda.py`` (``make gpu-check`` runs it together with
``make bench-gpu``). Everything here is compared with the CPU/NumPy result of the same function on
the same input, so a check cannot pass by accident on the device.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from conftest import run_module, tiny_overrides
from model_zoo import MODEL_CONFS, model_class, planted_overrides, small_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- every model of the zoo: its CUDA forward and backward against its CPU ones --------------------
def built_pair(compose_cfg, name: str, device: str):
    """The model ``name`` built twice from the same seed on a planted two-modality case: one left on the
    CPU, one copied to ``device`` (as Lightning moves it); and the data."""
    from mm_planted import planted_data

    from mllmrec.models.base import Inputs
    from mllmrec.pipeline import build_model

    data, mods = planted_data(modalities=("text", "image"))
    if model_class(name).needs == "features":
        users = np.random.default_rng(5).standard_normal((data.n_users, 16)).astype(np.float32)
        inputs = lambda: Inputs(data, user_features=users, item_features=mods["text"])  # noqa: E731
    else:
        inputs = lambda: Inputs(data, modalities=mods)  # noqa: E731
    cfg = compose_cfg(f"model={name}", *small_overrides(name), *planted_overrides(name))
    torch.manual_seed(0)
    cpu = build_model(cfg, inputs())
    torch.manual_seed(0)
    dev = build_model(cfg, inputs())
    dev.load_state_dict(cpu.state_dict())
    return cpu, dev.to(device), data


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """||got - want|| <= rel * ||want|| (+ a floor for all-zero tensors): float32 on two devices."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    err, scale = float((got - want).norm()), float(want.norm())
    assert err <= rel * scale + 1e-7, f"{what}: |diff| {err:.3g} vs |cpu| {scale:.3g}"


def compare_model_on(compose_cfg, name: str, device: str) -> bool:
    """Evaluation representations, a BPR loss through them and every parameter's gradient, on ``device``
    against the CPU; and, where the model's training loss draws no random numbers (the same loss under two
    seeds), the training loss ``batch_loss`` and its gradients too."""
    cpu, dev, data = built_pair(compose_cfg, name, device)
    gen = torch.Generator().manual_seed(11)
    users = torch.randint(data.n_users, (64,), generator=gen)
    pos, neg = torch.randint(data.n_items, (64,), generator=gen), torch.randint(data.n_items, (64,), generator=gen)
    on = {id(cpu): "cpu", id(dev): device}

    def through_representations(model):
        model.eval()
        model.zero_grad(set_to_none=True)
        h_u, h_i = model.representations()
        b = [t.to(on[id(model)]) for t in (users, pos, neg)]
        loss = -F.logsigmoid((h_u[b[0]] * (h_i[b[1]] - h_i[b[2]])).sum(1)).mean()
        if loss.requires_grad:
            loss.backward()
        return h_u, h_i, loss

    ref, got = through_representations(cpu), through_representations(dev)
    for what, a, b in zip(("user representations", "item representations", "loss"), got, ref):
        assert a.device.type == device.split(":")[0]
        assert_close_rel(a, b, 1e-4, f"{name} {what}")
    assert ref[2].requires_grad, f"{name}: no parameter reaches the representations"
    pairs = list(zip(cpu.named_parameters(), dev.parameters()))
    for (pname, p_cpu), p_dev in pairs:
        assert (p_cpu.grad is None) == (p_dev.grad is None), f"{name} {pname}: gradient on one device only"
        if p_cpu.grad is not None:
            assert_close_rel(p_dev.grad, p_cpu.grad, 1e-3, f"{name} {pname} gradient")

    def train_loss(model, seed):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = model.batch_loss(*(t.to(on[id(model)]) for t in (users, pos, neg)))
        loss.backward()
        return loss

    if float(train_loss(cpu, 1).detach()) != float(train_loss(cpu, 2).detach()):
        return False  # the training loss draws random numbers (dropout, noise, sampled edges): devices differ
    ref, got = train_loss(cpu, 1), train_loss(dev, 1)
    assert_close_rel(got, ref, 1e-4, f"{name} batch_loss")
    for (pname, p_cpu), p_dev in pairs:
        if p_cpu.grad is not None:
            assert_close_rel(p_dev.grad, p_cpu.grad, 1e-3, f"{name} {pname} batch_loss gradient")
    return True


@pytest.mark.parametrize("name", MODEL_CONFS)
def test_every_model_on_cuda_matches_its_cpu_forward_and_backward(compose_cfg, name):
    compare_model_on(compose_cfg, name, "cuda")


def test_knn_candidates_cuda_matches_numpy():
    from mllmrec.item_graph import knn_candidates

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((700, 48)).astype(np.float32)
    idx_cpu, sim_cpu = knn_candidates(feats, 10, chunk_size=128, device="cpu", progress=False)
    idx_gpu, sim_gpu = knn_candidates(feats, 10, chunk_size=128, device="cuda", progress=False)
    assert (idx_cpu[:, 0] == np.arange(700)).all() and (idx_gpu[:, 0] == np.arange(700)).all()
    # random features: no near-ties, so the neighbour lists must be identical
    np.testing.assert_array_equal(idx_gpu, idx_cpu)
    np.testing.assert_allclose(sim_gpu, sim_cpu, atol=1e-5)


def test_metrics_cuda_match_cpu():
    from mllmrec.metrics import EvalSpec, evaluate_batch, make_eval_batch

    rng = np.random.default_rng(1)
    n_users, n_items = 64, 300
    train = sp.random(n_users, n_items, density=0.05, format="csr", random_state=2)
    heldout = (sp.random(n_users, n_items, density=0.03, format="csr", random_state=3) - train.multiply(1e9)) > 0
    heldout = sp.csr_matrix(heldout, dtype=np.float32)
    users = np.flatnonzero(np.diff(heldout.indptr) > 0)
    batch = make_eval_batch(users, train, heldout)
    scores = torch.from_numpy(rng.standard_normal((len(users), n_items)).astype(np.float32))
    ks = EvalSpec.default().topk
    cpu = evaluate_batch(scores.clone(), batch, ks)
    gpu = evaluate_batch(scores.cuda(), {k: v.cuda() for k, v in batch.items()}, ks)
    assert set(cpu) == set(gpu)
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], msg=key)
    assert float(cpu["recall@20"].mean()) > 0  # the case has hits, so the comparison means something


def test_symmetric_graph_cuda_forward_backward():
    from mllmrec.models.layers import bipartite_norm_adj

    train = sp.random(40, 60, density=0.1, format="csr", random_state=4)
    graph = bipartite_norm_adj(train)
    dense = torch.from_numpy(graph.csr.toarray())
    x = torch.randn(100, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    xg = x.cuda().requires_grad_(True)
    out = graph.to("cuda")(xg)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.detach().cpu(), dense @ x, atol=1e-5, rtol=1e-5)
    weights = torch.randn(100, 8, generator=torch.Generator().manual_seed(6))
    (out * weights.cuda()).sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), dense.T @ weights, atol=1e-5, rtol=1e-5)


def test_negative_sampling_on_cuda_avoids_training_items():
    from mllmrec.datamodule import sample_negatives

    rng = np.random.default_rng(7)
    n_users, n_items = 50, 40
    pairs = {(u, i) for u in range(n_users) for i in rng.choice(n_items, 30, replace=False)}
    users = torch.tensor([u for u, _ in sorted(pairs)], device="cuda")
    keys = torch.tensor(sorted(u * n_items + i for u, i in pairs), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(8)
    neg = sample_negatives(users, keys, n_items, gen)
    assert neg.device.type == "cuda"
    chosen = set(zip(users.cpu().tolist(), neg.cpu().tolist()))
    assert not chosen & pairs
    assert 0 <= int(neg.min()) and int(neg.max()) < n_items


def _overrides(tiny_dir, out, *extra, sweep=None):
    return tiny_overrides(out, "encoder.model=random", "trainer=gpu", "logger=csv", *extra,
                          data_dir=tiny_dir, sweep=sweep)


@pytest.mark.slow
def test_train_cli_on_gpu(tiny_dir, tmp_path):
    proc = run_module("mllmrec.train", *_overrides(tiny_dir, tmp_path, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}/run"),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda"), metrics["device"]
    assert metrics["status"] == "completed" and metrics["epochs"] == 3
    for key in ("val/recall@20", "test/recall@20", "test/ndcg@20"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


@pytest.mark.slow
def test_grid_multirun_on_gpu(tiny_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_module("mllmrec.train", *_overrides(tiny_dir, tmp_path, "trainer.max_epochs=2", "graph.alpha=0.4,0.7",
                                                   "graph.k_c=5,10", sweep=sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(sweep / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    assert (sweep / "heatmap.png").stat().st_size > 0
    devices = {json.loads(p.read_text())["device"] for p in sweep.glob("*/metrics.json")}
    assert len(devices) == 1 and devices.pop().startswith("cuda")


def test_gpu_batch_loss_matches_the_deduplicated_cpu_one():
    """On CUDA the towers run on the batch's rows as drawn, on CPU on the distinct rows: same loss/grads."""
    from model_inputs import inputs_of

    from mllmrec.models.mllmrec import MLLMRecModule

    gen = torch.Generator().manual_seed(9)
    users_f, items_f = torch.randn(30, 16, generator=gen), torch.randn(25, 16, generator=gen)
    users = torch.randint(30, (64,), generator=gen)
    pos, neg = torch.randint(25, (64,), generator=gen), torch.randint(25, (64,), generator=gen)
    torch.manual_seed(0)
    inputs = inputs_of(shape=(30, 25), user_features=users_f, item_features=items_f)
    cpu = MLLMRecModule(inputs, d=8, d1=32)
    gpu = MLLMRecModule(inputs, d=8, d1=32)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    loss_cpu = cpu.batch_loss(users, pos, neg)
    loss_gpu = gpu.batch_loss(users.cuda(), pos.cuda(), neg.cuda())
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-5, rtol=1e-5)
    loss_cpu.backward()
    loss_gpu.backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---- model.cuda_graphs: the captured static-shape step, and blockwise evaluation on the GPU ----
def test_captured_step_matches_the_eager_static_step_and_the_normal_step():
    from test_static_step import make_model, triplets

    from mllmrec.models.static_step import ReplayableAdam, StaticStep

    models = {k: make_model(seed=0).cuda() for k in ("captured", "eager", "normal")}
    opts = {k: ReplayableAdam(m.parameters(), lr=1e-2, fused=True, capturable=True) for k, m in models.items()}
    steps = {k: StaticStep(models[k], capture=(k == "captured")) for k in ("captured", "eager")}
    # warm-up steps, the capture, replays, a short (padded) batch, and full batches again
    batches = [triplets(64, seed=s) for s in range(6)] + [triplets(23, seed=50), triplets(64, seed=51)]
    for users, pos, neg in batches:
        b = [t.cuda() for t in (users, pos, neg)]
        losses = {k: float(steps[k](opts[k], *b)) for k in steps}
        opts["normal"].zero_grad(set_to_none=True)
        ref = models["normal"].batch_loss(*b)
        ref.backward()
        opts["normal"].step()
        assert losses["captured"] == pytest.approx(losses["eager"], rel=1e-5)
        assert losses["captured"] == pytest.approx(float(ref), rel=1e-4)
        # the step's gradients (the captured ones live in the graph's static .grad tensors)
        for (name, p), p_eager in zip(models["captured"].named_parameters(), models["eager"].parameters()):
            if name != "item_tower.fc2.bias":  # zero-gradient direction: rounding noise only
                torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert steps["captured"].graph is not None and steps["eager"].graph is None
    for name, p in models["captured"].named_parameters():
        if name == "item_tower.fc2.bias":  # zero-gradient direction: rounding noise only (see test_static_step)
            continue
        eager, normal = dict(models["eager"].named_parameters())[name], dict(models["normal"].named_parameters())[name]
        torch.testing.assert_close(p, eager, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(p, normal, rtol=1e-3, atol=1e-4, msg=name)


def test_captured_step_inside_lightning_trains_like_the_normal_step_and_resumes(tiny_data, tmp_path):
    from test_static_step import fit

    normal, t_normal = fit(tiny_data, tmp_path / "normal", False, 3, accelerator="gpu")
    graphed, t_graphed = fit(tiny_data, tmp_path / "graphed", True, 3, accelerator="gpu")
    assert graphed._static is not None and graphed._static.graph is not None  # 12 steps: captured at step 4
    assert t_graphed.global_step == t_normal.global_step == 12
    # then the same validation metrics, epoch by epoch's best
    assert graphed.best["epoch"] == normal.best["epoch"]
    for key, value in normal.best.items():
        if key != "epoch":
            assert graphed.best[key] == pytest.approx(value, abs=1e-6), key
    for (name, p_ref), (_, p) in zip(normal.named_parameters(), graphed.named_parameters()):
        if name != "item_tower.fc2.bias":
            torch.testing.assert_close(p, p_ref, rtol=1e-3, atol=1e-4, msg=name)
    fit(tiny_data, tmp_path / "part", True, 2, accelerator="gpu")
    resumed, t_resumed = fit(tiny_data, tmp_path / "part", True, 3, accelerator="gpu",
                             ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert t_resumed.global_step == 12
    for (name, p_ref), (_, p) in zip(graphed.named_parameters(), resumed.named_parameters()):
        if name != "item_tower.fc2.bias":
            torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_blockwise_evaluation_on_cuda_equals_the_dense_reference():
    from test_eval_blocks import N_ITEMS, blockwise, case, dense_reference

    h_u, h_i, train, held, users = case(seed=3)
    expected = dense_reference(h_u, h_i, train, held, users)
    got, shapes = blockwise(h_u, h_i, train, held, users, block=16, device="cuda")
    for m, v in expected.items():
        assert got[m] == pytest.approx(v, abs=1e-6), m
    assert all(r <= 16 and c == N_ITEMS for r, c in shapes)


@pytest.mark.slow
def test_joblib_jobs_take_their_gpu_by_job_number(tiny_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    n_gpus = torch.cuda.device_count()
    proc = run_module("mllmrec.train", *tiny_overrides(
        tmp_path, "encoder.model=random", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "graph.alpha=0.6",
        "graph.k_c=5,10",
        "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"launcher.gpus_per_node={n_gpus}",
        data_dir=tiny_dir, sweep=tmp_path / "sweep"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in sorted((tmp_path / "sweep").glob("[0-9]*")):
        num = int(job.name.split("_")[0])
        assert f"trains on cuda:{num % n_gpus}" in (job / "train.log").read_text()
        assert json.loads((job / "metrics.json").read_text())["device"].startswith("cuda")
