"""The measured pieces of :mod:`mllmrec.bench`, each run alone in a fresh interpreter
(:mod:`mllmrec.bench.child`) so that its peak memory is its own. Each returns a JSON-able dict.

- ``graph_ours`` / ``graph_dense``: our sparse graph stage vs a dense re-implementation of the
  official algorithm (dense |I|x|I| cosine + top-k, dense |U|x|I| matrix for the Jaccard product)
  on the dataset's training interactions with random unit 384-d item features; the two graphs'
  edge digests are compared.
- ``train_ours`` / ``train_official``: our epoch (train + validation, Lightning) vs the official
  loop structure (every batch: item propagation + towers over ALL users and items; every eval
  batch likewise).
- ``gemm_floor``: the matrix products such an epoch cannot avoid, timed alone.
- ``eval_ours``: our full-ranking Recall/NDCG@10/20 over all validation users.
- ``grid``: the 16-cell grid through the CLI (:mod:`mllmrec.bench.grid`).
- ``profile_step`` (:mod:`mllmrec.bench.profile`, CUDA): torch.profiler over training steps, eager and captured: the top kernels
  and the kernel launches per step, i.e. why an epoch is above its GEMM floor.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from mllmrec.bench.grid import piece_grid
from mllmrec.vectors import random_unit_rows

FEATURE_DIM = 384


def peak_mb() -> dict:
    """Peak RSS of this process in MB, plus the peak CUDA allocation when the piece used a GPU."""
    from mllmrec.bench.scale_pieces import rss_mb

    out = {"peak_mb": rss_mb()["peak_rss_mb"]}  # VmHWM: ru_maxrss would include the driver's peak (fork)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def warm_up(device: str) -> None:
    """Create the CUDA context and cuBLAS handle before a timed region (no-op on CPU)."""
    if device != "cpu":
        import torch

        x = torch.ones(64, 64, device=device)
        (x @ x).sum().item()


def load(data_root: str, name: str):
    from mllmrec.data import load_dataset

    return load_dataset(name, Path(data_root) / name)


def graph_digest(rows, cols, vals) -> tuple[str, int]:
    """Order-independent fingerprint of a weighted edge list (weights rounded to 1e-5)."""
    order = np.lexsort((cols, rows))
    h = hashlib.sha256()
    h.update(np.asarray(rows)[order].astype(np.int64).tobytes())
    h.update(np.asarray(cols)[order].astype(np.int64).tobytes())
    h.update(np.round(np.asarray(vals, np.float64)[order], 5).tobytes())
    return h.hexdigest()[:16], int(len(order))


def piece_graph_ours(data_root, dataset, k_s=10, k_c=10, alpha=0.15, layers=1, device="cpu", **_):
    from mllmrec.item_graph import cooccurrence_topk, knn_candidates, propagate, refine_item_graph, sym_normalize

    data = load(data_root, dataset)
    feats = random_unit_rows(data.n_items, FEATURE_DIM, 0)
    train = data.train_matrix
    warm_up(device)
    start = time.perf_counter()
    idx, sim = knn_candidates(feats, k_s, device=device, progress=False)
    cooc = cooccurrence_topk(train, k_c, progress=False)
    adj = refine_item_graph(idx, sim, cooc, alpha)
    e_star = propagate(sym_normalize(adj), feats, layers)
    seconds = time.perf_counter() - start
    coo = adj.tocoo()
    digest, edges = graph_digest(coo.row, coo.col, coo.data)
    return {"seconds": seconds, **peak_mb(), "digest": digest, "edges": edges,
            "items": data.n_items, "e_star_checksum": float(np.abs(e_star).sum())}


def piece_graph_dense(data_root, dataset, k_s=10, k_c=10, alpha=0.15, layers=1, device="cpu", **_):
    """The official algorithm's structure: dense matrices throughout (ties broken like ours).

    alpha defaults to 0.15 in these benchmarks: random unit 384-d features have cosine
    similarities near 0, so a paper-like 0.4-0.7 would keep only the self-loops.
    """
    import torch

    data = load(data_root, dataset)
    feats = random_unit_rows(data.n_items, FEATURE_DIM, 0)
    train = data.train_matrix
    dev = torch.device(device)
    warm_up(device)
    start = time.perf_counter()
    x = torch.from_numpy(feats).to(dev)
    xn = x / x.norm(dim=-1, keepdim=True)
    sim = xn @ xn.T                                            # |I| x |I|
    val, ind = torch.topk(sim, k_s, dim=-1)
    adj = torch.zeros_like(sim).scatter_(-1, ind, val)
    del sim
    adj = (adj >= alpha).float() if alpha > 0 else adj
    a = torch.tensor(train.toarray(), device=dev).T            # dense |I| x |U|
    inter = a @ a.T                                            # |I| x |I|
    deg = a.sum(1, keepdim=True)
    union = deg + deg.T - inter
    jac = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
    del inter, union, a
    jac.fill_diagonal_(0)
    sval, sind = torch.sort(jac, dim=1, descending=True, stable=True)  # ties: smaller index first
    sval, sind = sval[:, :k_c], sind[:, :k_c]
    adj_jac = torch.zeros_like(jac).scatter_(-1, sind, sval)
    del jac
    mat = adj + adj_jac
    rowsum = mat.sum(-1)
    d = rowsum.pow(-0.5)
    d[torch.isinf(d)] = 0
    norm = d[:, None] * mat * d[None, :]
    e, total = x, x.clone()
    for _ in range(layers):
        e = norm @ e
        total = total + e
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    nz = mat.nonzero(as_tuple=True)
    digest, edges = graph_digest(nz[0].cpu().numpy(), nz[1].cpu().numpy(), mat[nz].cpu().numpy())
    return {"seconds": seconds, **peak_mb(), "digest": digest, "edges": edges,
            "items": data.n_items, "e_star_checksum": float(total.abs().sum())}


def _sports_setup(data_root, dataset, device, eval_batch_size="auto", cuda_graphs=False):
    import torch

    from mllmrec.datamodule import RecDataModule
    from mllmrec.models.base import Inputs
    from mllmrec.models.mllmrec import MLLMRecModule

    data = load(data_root, dataset)
    users = random_unit_rows(data.n_users, FEATURE_DIM, 1)
    items = random_unit_rows(data.n_items, FEATURE_DIM, 2)
    torch.manual_seed(0)
    model = MLLMRecModule(Inputs(data, users, items), cuda_graphs=cuda_graphs)
    dm = RecDataModule(batch_size=2048, eval_batch_size=eval_batch_size, seed=0).attach(data)
    return data, model, dm


def piece_train_ours(data_root, dataset, epochs=3, device="cpu", cuda_graphs=False, **_):
    """Per-epoch seconds of our Lightning loop (train + validation); first epoch is warm-up."""
    import pytorch_lightning as pl

    data, model, dm = _sports_setup(data_root, dataset, device, cuda_graphs=cuda_graphs)
    times = []

    class Timer(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Timer()],
    )
    trainer.fit(model, datamodule=dm)
    steady = times[1:] or times
    return {"epoch_seconds": float(np.median(steady)), "epochs_timed": len(steady), **peak_mb(),
            "first_epoch_seconds": times[0]}


def piece_train_official(data_root, dataset, epochs=1, device="cpu", **_):
    """The official loop's structure: per batch, item propagation + full forward over all users and
    items, then index the batch; per eval batch, the same full forward. Same towers, same data."""
    import torch

    from mllmrec.datamodule import sample_negatives
    from mllmrec.item_graph import cooccurrence_topk, knn_candidates, refine_item_graph, sym_normalize
    from mllmrec.metrics import EvalSpec, evaluate_batch
    from mllmrec.models.losses import bpr_logsigmoid

    data, model, dm = _sports_setup(data_root, dataset, device, eval_batch_size=4096)  # MMRec's eval batch
    dev = torch.device(device)
    feats = model.item_feat.numpy()
    idx, sim = knn_candidates(feats, 10, progress=False)
    norm = sym_normalize(refine_item_graph(idx, sim, cooccurrence_topk(data.train_matrix, 10, progress=False), 0.5)).tocoo()
    ii = torch.sparse_coo_tensor(np.vstack([norm.row, norm.col]), norm.data, norm.shape).coalesce().to(dev)
    model = model.to(dev)
    dm.setup()
    dm.train_users, dm.train_items, dm.train_keys = (t.to(dev) for t in (dm.train_users, dm.train_items, dm.train_keys))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def forward():
        e_i = torch.stack([model.item_feat, torch.sparse.mm(ii, model.item_feat)], 1).sum(1)  # II_GCN, L=1
        return model.user_tower(model.user_feat), model.item_tower(e_i)

    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        gen = torch.Generator(device=dev).manual_seed(epoch)
        perm = torch.randperm(dm.train_users.numel(), generator=gen, device=dev)
        users, pos = dm.train_users[perm], dm.train_items[perm]
        neg = sample_negatives(users, dm.train_keys, data.n_items, gen)
        model.train()
        for s in range(0, users.numel(), 2048):
            opt.zero_grad()
            h_u, h_i = forward()
            loss = bpr_logsigmoid(h_u[users[s:s + 2048]], h_i[pos[s:s + 2048]], h_i[neg[s:s + 2048]])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for batch in dm.eval_batches["valid"]:
                batch = {k: v.to(dev) for k, v in batch.items()}
                h_u, h_i = forward()
                evaluate_batch(h_u[batch["users"]] @ h_i.T, batch, EvalSpec.default().topk)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"epoch_seconds": float(np.median(times)), "epochs_timed": len(times), **peak_mb()}


def piece_eval_ours(data_root, dataset, device="cpu", repeats=3, **_):
    """Seconds of the model's full-ranking evaluation (:meth:`RankingModule.evaluate`) over all
    validation users; the median of ``repeats``."""
    data, model, dm = _sports_setup(data_root, dataset, device)
    model = model.to(device)
    dm.setup()
    batches = [{k: v.to(device) for k, v in b.items()} for b in dm.eval_batches["valid"]]
    times, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = model.evaluate(batches)
        times.append(time.perf_counter() - start)
    users = sum(int(b["users"].numel()) for b in batches)
    return {"seconds": float(np.median(times)), "users": users, **peak_mb(), **result}


def piece_gemm_floor(data_root, dataset, device="cpu", repeats=3, d1=256, d=64, **_):
    """The matrix products one epoch (train + validation) cannot avoid, timed alone.

    Training: for every batch of an epoch, both towers' forward (X W1, A W2) and backward (dW2,
    dA, dW1) GEMMs over the batch's distinct users / items, the fewest rows that give the exact
    gradients. Validation: the user x item score products of all validation users. Inputs are
    preallocated and nothing else runs (no gathers, activations, loss, optimizer, top-k, Python
    loop of a trainer), so no exact fp32 implementation of these towers can be faster.
    """
    import torch

    data, model, dm = _sports_setup(data_root, dataset, device)
    dm.setup()
    dev = torch.device(device)
    d_in = model.item_feat.shape[1]
    rows = []
    for users, pos, neg in dm.train_dataloader():
        rows += [int(torch.unique(users).numel()), int(torch.unique(torch.cat([pos, neg])).numel())]
    top = max(rows)
    x = torch.randn(top, d_in, device=dev)
    w1, w2 = torch.randn(d1, d_in, device=dev), torch.randn(d, d1, device=dev)
    a1, g2, g1 = torch.empty(top, d1, device=dev), torch.randn(top, d, device=dev), torch.empty(top, d1, device=dev)
    h2, dw1, dw2 = torch.empty(top, d, device=dev), torch.empty(d1, d_in, device=dev), torch.empty(d, d1, device=dev)
    n_val = sum(int(b["users"].numel()) for b in dm.eval_batches["valid"])
    block = max(int(b["users"].numel()) for b in dm.eval_batches["valid"])
    hu, hit = torch.randn(block, d, device=dev), torch.randn(d, data.n_items, device=dev)
    scores = torch.empty(block, data.n_items, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train_t, eval_t = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for r in rows:
            torch.mm(x[:r], w1.T, out=a1[:r])
            torch.mm(a1[:r], w2.T, out=h2[:r])
            torch.mm(g2[:r].T, a1[:r], out=dw2)
            torch.mm(g2[:r], w2, out=g1[:r])
            torch.mm(g1[:r].T, x[:r], out=dw1)
        sync()
        train_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        for s0 in range(0, n_val, block):
            b = min(block, n_val - s0)
            torch.mm(hu[:b], hit, out=scores[:b])
        sync()
        eval_t.append(time.perf_counter() - start)
    train_s, eval_s = float(np.min(train_t)), float(np.min(eval_t))
    return {"seconds": train_s + eval_s, "train_seconds": train_s, "eval_seconds": eval_s, "steps": len(rows) // 2,
            "mean_rows_per_step": float(np.mean(rows) * 2), **peak_mb()}


PIECES = {
    "gemm_floor": piece_gemm_floor,
    "graph_ours": piece_graph_ours,
    "graph_dense": piece_graph_dense,
    "train_ours": piece_train_ours,
    "train_official": piece_train_official,
    "eval_ours": piece_eval_ours,
    "grid": piece_grid,
}

# the stages of mllmrec.bench.scale, run by the same child process
from mllmrec.bench.scale_pieces import SCALE_PIECES  # noqa: E402

PIECES.update(SCALE_PIECES)
