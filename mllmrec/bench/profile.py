"""The bench's ``profile_step`` piece (CUDA): torch.profiler over training steps of the sports epoch,
the normal step and the captured one (``model.cuda_graphs``): ms per step, kernel launches per step
and the top kernels, i.e. why an epoch sits above its GEMM floor (docs/benchmarks.md)."""

from __future__ import annotations

import time


def _profiled(step, n_steps: int, top: int, device: str) -> dict:
    """Run ``step()`` ``n_steps`` times under torch.profiler: ms per step, launches per step, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        start = time.perf_counter()
        for _ in range(n_steps):
            step()
        sync()
        seconds = time.perf_counter() - start
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                         "cuLaunchKernelEx"))
    graph_launches = sum(e.count for e in events if e.key in ("cudaGraphLaunch", "cuGraphLaunch"))
    if not cuda:  # a dry run on CPU: the top operators by their own CPU time
        device_us = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    def on_device(e) -> bool:  # a kernel or copy (device-side event), not a CPU op that launched it
        kind = getattr(e, "device_type", None)
        return (str(kind).endswith("CUDA") if kind is not None else not e.key.startswith(("aten::", "cuda", "Optimizer")))

    kernels = sorted((e for e in events if device_us(e) > 0 and (not cuda or on_device(e))), key=device_us,
                     reverse=True)
    gpu_ms = sum(device_us(e) for e in kernels) / 1000.0
    return {"ms_per_step": 1000.0 * seconds / n_steps, "gpu_busy_ms_per_step": gpu_ms / n_steps,
            "kernel_launches_per_step": launches / n_steps, "graph_launches_per_step": graph_launches / n_steps,
            "top_kernels": [{"name": e.key[:90], "count_per_step": e.count / n_steps,
                             "us_per_step": device_us(e) / n_steps} for e in kernels[:top]]}


def piece_profile_step(data_root, dataset, device="cuda", steps=30, warmup=8, top=8, **_):
    """torch.profiler over ``steps`` training steps of the sports epoch (batch 2048), the normal step
    (batch_loss, backward, fused Adam) and the captured static step (``model.cuda_graphs``)."""
    import torch

    from mllmrec.bench.pieces import _sports_setup, peak_mb
    from mllmrec.models.static_step import ReplayableAdam, StaticStep

    out = {}
    for mode in ("eager", "captured"):
        data, model, dm = _sports_setup(data_root, dataset, device)
        model = model.to(device)
        dm.setup()
        dm.train_users, dm.train_items, dm.train_keys = (t.to(device) for t in (dm.train_users, dm.train_items,
                                                                                  dm.train_keys))
        batches = [b for b in dm.train_dataloader()][:-1]  # full batches only
        batches = [batches[i % len(batches)] for i in range(warmup + steps)]
        it = iter(batches)
        if mode == "eager":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

            def step():
                opt.zero_grad(set_to_none=True)
                model.batch_loss(*next(it)).backward()
                opt.step()
        else:
            opt = ReplayableAdam(model.parameters(), lr=1e-3, fused=True, capturable=True)
            static = StaticStep(model, capture=device == "cuda")

            def step():
                static(opt, *next(it))
        for _ in range(warmup):
            step()
        out[mode] = _profiled(step, steps, top, device)
    out["steps_per_epoch"] = len(dm.train_dataloader())
    out["seconds"] = out["captured"]["ms_per_step"] / 1000.0
    return {**out, **peak_mb()}
