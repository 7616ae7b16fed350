"""The measured stages of :mod:`mllmrec.bench.scale`, each run alone in a fresh interpreter
(:mod:`mllmrec.bench.child`) so that its peak RSS is its own. Each returns a JSON-able dict with
``seconds`` (the stage's own work, wall time inside the process), ``cpu_seconds`` (its CPU time, all
threads: less sensitive to other work on a shared machine) and ``peak_rss_mb`` (the whole process:
interpreter, imports, the inputs it reads and the stage), plus ``rss_before_mb`` (the same just before
the stage's work) where it helps.

Stages hand their outputs to the next through files in ``work`` (one folder per size):

- ``load``: :func:`mllmrec.data.load_dataset` on the ``.inter``; writes ``data.npz`` (the parsed
  arrays) so that the later stages skip the text parsing;
- ``knn``: :func:`mllmrec.item_graph.knn_candidates` (K_s) on the item features -> ``knn.npz``;
- ``cooccurrence``: :func:`mllmrec.item_graph.cooccurrence_topk` (K_c) -> ``cooc.npz``;
- ``graph``: :func:`refine_item_graph` + :func:`sym_normalize` + :func:`propagate` -> ``e_star.npy``;
- ``build`` / ``epoch``: one model built from its ``conf/model`` defaults (its own graphs included),
  then one training epoch (BPR triplets of :class:`mllmrec.datamodule.TripletEpochs`, the model's
  ``batch_loss``, backward, its optimizer); an epoch longer than ``budget_s`` is stopped there and
  its time extrapolated from the steps done (``extrapolated``); the weights -> ``<model>.pt``;
- ``eval``: one full-ranking evaluation of every test user (:meth:`RankingEvaluation.evaluate` over
  :class:`RecDataModule`'s prebuilt batches), with the weights of ``epoch`` when it completed;
- ``pop``: the popularity ranking (training counts) under the same evaluation, the floor a model
  that learns must beat.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np


def rss_mb() -> dict:
    """The peak RSS of this process: VmHWM, the high-water mark of its own address space (getrusage's
    ru_maxrss is not: a child started by fork + exec inherits its parent's peak, here the driver's,
    which may have generated a large dataset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"peak_rss_mb": int(line.split()[1]) / 1024.0}
    except OSError:  # pragma: no cover - not Linux
        pass
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _data(work: str):
    """RecData from the ``load`` stage's arrays (no text parsing)."""
    from mllmrec.data import RecData

    z = np.load(Path(work) / "data.npz")
    return RecData(str(z["name"]), int(z["n_users"]), int(z["n_items"]), z["users"], z["items"], z["split"])


def piece_load(work, data_dir, name, **_):
    from mllmrec.data import load_dataset

    start, cpu = time.perf_counter(), time.process_time()
    data = load_dataset(name, data_dir)
    train = data.train_matrix
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    np.savez(Path(work) / "data.npz", name=data.name, n_users=data.n_users, n_items=data.n_items,
             users=data.users, items=data.items, split=data.split)
    return {"seconds": seconds, "cpu_seconds": cpu, **rss_mb(), "n_users": data.n_users, "n_items": data.n_items,
            "n_interactions": int(len(data.users)), "train_interactions": int(train.nnz)}


def piece_knn(work, features, k_s=10, knn="exact", nlist=None, nprobe=None, **_):
    from mllmrec.item_graph import knn_candidates

    feats = np.load(features)
    before = current_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    idx, sim = knn_candidates(feats, k_s, progress=False, method=knn, nlist=nlist, nprobe=nprobe)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    np.savez(Path(work) / "knn.npz", idx=idx, sim=sim)
    return {"seconds": seconds, "cpu_seconds": cpu, **rss_mb(), "rss_before_mb": before, "knn": knn}


def piece_cooccurrence(work, k_c=10, **_):
    import scipy.sparse as sp

    from mllmrec.item_graph import cooccurrence_topk

    train = _data(work).train_matrix
    before = current_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    cooc = cooccurrence_topk(train, k_c, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sp.save_npz(Path(work) / "cooc.npz", cooc)
    return {"seconds": seconds, "cpu_seconds": cpu, **rss_mb(), "rss_before_mb": before, "edges": int(cooc.nnz),
            "sum_user_degree_sq": float((np.diff(train.indptr).astype(np.float64) ** 2).sum())}


def piece_graph(work, features, alpha=0.7, layers=1, **_):
    import scipy.sparse as sp

    from mllmrec.item_graph import propagate, refine_item_graph, sym_normalize

    knn = np.load(Path(work) / "knn.npz")
    cooc = sp.load_npz(Path(work) / "cooc.npz")
    feats = np.load(features)
    before = current_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    adj = refine_item_graph(knn["idx"], knn["sim"], cooc, alpha)
    e_star = propagate(sym_normalize(adj), feats, layers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    np.save(Path(work) / "e_star.npy", e_star)
    return {"seconds": seconds, "cpu_seconds": cpu, **rss_mb(), "rss_before_mb": before, "edges": int(adj.nnz)}


# ---------------------------------------------------------------------------- models
def _cfg(model: str, data_dir: str, seed: int, knn: str = "exact"):
    from hydra import compose, initialize_config_dir

    from mllmrec import config as mconfig

    with initialize_config_dir(version_base="1.3", config_dir=str(mconfig.CONF_DIR)):
        return compose(config_name="train", overrides=[f"model={model}", "dataset=synthetic",
                                                       f"dataset.data_dir={data_dir}", f"seed={seed}",
                                                       f"graph.knn={knn}"])


def _inputs(cfg, work: str, data_dir: str):
    """The inputs the model's class asks for, from the files of the dataset and the graph stage."""
    from hydra.utils import get_class

    from mllmrec.models.base import Inputs

    data = _data(work)
    needs = get_class(cfg.model._target_).needs
    inputs = Inputs(data)
    if needs == "features":  # MLLMRec: user preferences + E* of the refined graph
        inputs.user_features = np.load(Path(data_dir) / "user_feat.npy")
        inputs.item_features = np.load(Path(work) / "e_star.npy")
    elif needs == "modalities":
        inputs.modalities = {m: np.load(Path(data_dir) / f) for m, f in cfg.dataset.features.items()}
    return inputs


def _built(model, work, data_dir, seed, knn="exact"):
    import torch

    from mllmrec.pipeline import build_model

    cfg = _cfg(model, data_dir, seed, knn)
    inputs = _inputs(cfg, work, data_dir)
    torch.manual_seed(seed)
    start = time.perf_counter()
    net = build_model(cfg, inputs)
    return cfg, inputs, net, time.perf_counter() - start


def _datamodule(cfg, data):
    from hydra.utils import instantiate

    return instantiate(cfg.data).attach(data)


def piece_epoch(work, data_dir, model, seed=0, budget_s=600.0, knn="exact", **_):
    import torch

    before = current_rss_mb()
    cfg, inputs, net, build_s = _built(model, work, data_dir, seed, knn)
    build_peak = rss_mb()["peak_rss_mb"]
    dm = _datamodule(cfg, inputs.data)
    start = time.perf_counter()
    dm.setup()
    setup_s = time.perf_counter() - start
    opt = net.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    net.train()
    batches = dm.train_dataloader()
    total = len(batches)
    steps = 0
    start, cpu = time.perf_counter(), time.process_time()
    hook = getattr(net, "on_train_epoch_start", None)
    if hook is not None:
        hook()
    for users, pos, neg in batches:
        opt.zero_grad(set_to_none=True)
        loss = net.batch_loss(users, pos, neg)
        loss.backward()
        opt.step()
        steps += 1
        if time.perf_counter() - start > budget_s and steps < total:
            break
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    done = steps == total
    if done:
        torch.save(net.state_dict(), Path(work) / f"{model}.pt")
    return {"seconds": elapsed * total / steps, "measured_seconds": elapsed, "cpu_seconds": cpu * total / steps, "steps": steps, "steps_total": total,
            "extrapolated": not done, "loss": float(loss.detach()), "build_seconds": build_s,
            "build_peak_rss_mb": build_peak, "setup_seconds": setup_s, "rss_before_mb": before, **rss_mb()}


def _eval_batches(dm, split="test"):
    return dm.eval_batches[split]


def piece_eval(work, data_dir, model, seed=0, budget_s=600.0, knn="exact", **_):
    import torch

    cfg, inputs, net, _ = _built(model, work, data_dir, seed, knn)
    weights = Path(work) / f"{model}.pt"
    trained = weights.is_file()
    if trained:
        net.load_state_dict(torch.load(weights))
    dm = _datamodule(cfg, inputs.data)
    start = time.perf_counter()
    dm.setup()
    setup_s = time.perf_counter() - start
    setup_peak = rss_mb()["peak_rss_mb"]
    net.eval()
    before = current_rss_mb()
    batches = _eval_batches(dm)
    total = sum(int(b["users"].numel()) for b in batches)
    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        net.begin_evaluation()  # the representation pass, once
        repr_s, repr_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu, done = time.perf_counter(), time.process_time(), 0
        for batch in batches:
            net.evaluation_step(batch)
            done += int(batch["users"].numel())
            if time.perf_counter() - start > budget_s and done < total:
                break
        loop_s, loop_cpu = time.perf_counter() - start, time.process_time() - cpu
        metrics = {k: float(v) for k, v in net._evaluation_means().items()}
    return {"seconds": repr_s + loop_s * total / done, "measured_seconds": repr_s + loop_s, "extrapolated": done < total,
            "cpu_seconds": repr_cpu + loop_cpu * total / done,
            "users": total, "users_done": done, "representations_seconds": repr_s, **rss_mb(), "rss_before_mb": before,
            "setup_seconds": setup_s, "setup_peak_rss_mb": setup_peak, "after_one_epoch": trained,
            **{f"test/{k}": v for k, v in metrics.items()}}


def piece_pop(work, data_dir, seed=0, budget_s=600.0, **_):
    """Most popular training items first (ties: smaller id), training items masked."""
    import torch

    from mllmrec.datamodule import RecDataModule
    from mllmrec.metrics import EvalSpec, evaluate_batch

    data = _data(work)
    dm = RecDataModule(seed=seed).attach(data)
    dm.setup()
    counts = np.bincount(data.pairs("train")[1], minlength=data.n_items).astype(np.float64)
    score = torch.as_tensor(counts - np.arange(data.n_items) / (2.0 * data.n_items), dtype=torch.float64)
    spec = EvalSpec.default()
    sums, n = {}, 0
    total = sum(int(b["users"].numel()) for b in dm.eval_batches["test"])
    start, cpu = time.perf_counter(), time.process_time()
    for batch in dm.eval_batches["test"]:
        scores = score.expand(batch["users"].numel(), -1).clone()
        for m, v in evaluate_batch(scores, batch, spec.topk).items():
            sums[m] = sums.get(m, 0.0) + float(v.sum())
        n += int(batch["users"].numel())
        if time.perf_counter() - start > budget_s and n < total:
            break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds * total / n, "measured_seconds": seconds, "cpu_seconds": cpu * total / n, "extrapolated": n < total, "users": total,
            "users_done": n, **rss_mb(), **{f"test/{m}": v / max(n, 1) for m, v in sums.items()}}


SCALE_PIECES = {
    "scale_load": piece_load,
    "scale_knn": piece_knn,
    "scale_cooccurrence": piece_cooccurrence,
    "scale_graph": piece_graph,
    "scale_epoch": piece_epoch,
    "scale_eval": piece_eval,
    "scale_pop": piece_pop,
}
