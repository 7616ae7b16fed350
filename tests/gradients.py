"""Gradient checks shared by the tests: a model's autograd gradient against central finite differences
of a loss (the model's own, or a float64 reference re-derived from the official code), with the
model's randomness fixed for both; and :func:`distinct_settings`, a test case's settings checked for
distinct values within each kind (so that swapping two settings of the same kind changes the result).

Parameters the training loss does not reach are declared by the model
(:meth:`mllmrec.models.base.RankingModule.unreached_parameters`); :func:`check_reach` holds the model to
its declaration: a declared parameter gets no gradient, every other one a nonzero gradient somewhere.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import torch

SEED = 1234  # the model's randomness (dropout masks, noise draws, pruned edges) for every loss evaluation


def fixed_randomness_loss(model, batch) -> torch.Tensor:
    """The training loss of ``batch`` as the first batch of an epoch, with the same random draws every
    call: torch reseeded, then the epoch hook (FREEDOM's pruned graph, LATTICE's learned graph), then
    ``batch_loss``. Dropout draws the same mask on every call."""
    torch.manual_seed(SEED)
    model.on_train_epoch_start()
    return model.batch_loss(*batch)


def sampled_entries(name: str, grad: torch.Tensor, largest: int = 3, random: int = 2) -> list[int]:
    """Flat indices of ``largest`` entries with the largest |grad| and ``random`` other entries (seeded by
    the name: the same entries every run), zero-gradient ones included."""
    flat = grad.reshape(-1).abs()
    top = torch.topk(flat, min(largest, flat.numel())).indices.tolist()
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rest = [int(i) for i in rng.permutation(flat.numel()) if int(i) not in top][:random]
    return top + rest


def finite_difference(loss_fn: Callable[[], float], param: torch.Tensor, index: int, eps: float) -> float:
    """(L(p + eps) - L(p - eps)) / (2 eps) in entry ``index`` of ``param`` (restored afterwards)."""
    flat = param.data.view(-1)
    old = flat[index].item()
    try:
        flat[index] = old + eps
        up = float(loss_fn())
        flat[index] = old - eps
        down = float(loss_fn())
    finally:
        flat[index] = old
    return (up - down) / (2 * eps)


def autograd_gradients(model, loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()
            if p.requires_grad}


def check_reach(model, grads: dict[str, torch.Tensor | None]) -> None:
    """Declared unreached parameters get no (or an all-zero) gradient; every other one a nonzero one."""
    declared = set(model.unreached_parameters())
    unknown = declared - set(grads)
    assert not unknown, f"declared unreached but not parameters: {sorted(unknown)}"
    for name, grad in grads.items():
        reached = grad is not None and bool(grad.abs().sum() > 0)
        if name in declared:
            assert not reached, f"{name}: declared unreached (unreached_parameters) but the loss reaches it"
        else:
            assert reached, f"{name}: the loss does not reach it and the model does not declare it"


def assert_gradients_match(model, grads: dict, loss_value: Callable[[], float], eps: float = 1e-6,
                           rtol: float = 1e-4, atol: float = 1e-7, params=None, entries=sampled_entries,
                           what: str = "finite differences") -> int:
    """``grads[name]`` at the sampled entries of each parameter against central differences of
    ``loss_value`` (a float function of the model's current parameters); ``params``: the parameters by
    name to perturb (default: the model's). Returns the number of entries checked."""
    params = dict(model.named_parameters()) if params is None else params
    checked, failures = 0, []
    for name, param in params.items():
        grad = grads.get(name)
        if grad is None:
            continue
        for index in entries(name, grad):
            fd = finite_difference(loss_value, param, index, eps)
            got = grad.reshape(-1)[index].item()
            checked += 1
            if abs(got - fd) > atol + rtol * abs(fd):
                failures.append(f"{name}[{index}]: autograd {got:.9g} vs {what} {fd:.9g}")
    assert not failures, f"{len(failures)} gradient entries disagree:\n" + "\n".join(failures[:20])
    return checked


def every_entry(name: str, grad: torch.Tensor) -> range:
    return range(grad.numel())


def distinct_settings(**groups: dict) -> dict:
    """The settings of a test case, merged, after checking that within each group (one kind: k's, layer
    counts, loss weights, temperatures) no two settings share a value, so that a swap of two settings of
    the same kind changes the result. ``distinct_settings(ks={"knn_i": 2, "knn_k": 4}, weights={...})``."""
    merged = {}
    for kind, settings in groups.items():
        seen = {}
        for key, value in settings.items():
            assert value not in seen, f"{kind}: {key} = {seen[value]} = {value!r}: a swap would go unseen"
            seen[value] = key
            assert key not in merged, f"{key} given twice"
            merged[key] = value
    return merged
