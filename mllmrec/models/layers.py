"""Propagation and edge layers shared by the models: fixed sparse graphs applied with autograd
(:class:`SymmetricGraph` on SciPy/torch CSR kernels, :class:`EdgeGraph` / :func:`edge_matmul` on edge
lists), the normalised user-item graph and LightGCN's layer sum/mean, and :func:`rows`, a gather with
a deterministic backward."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


def rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` with a deterministic backward for repeated indices.

    On CPU with several threads, the backward of advanced indexing (``index_put_`` with
    accumulation) adds the gradients of repeated rows in a varying order, so two runs of the same
    config drift apart; ``embedding``'s backward sums them in a fixed order.
    """
    return F.embedding(index, table)



class SymmetricGraph(nn.Module):
    """A fixed symmetric sparse matrix A applied as ``A @ x`` with autograd (grad = A @ grad).

    On CPU it multiplies with SciPy's CSR kernel (several times faster than torch's CPU sparse
    matmul here); on CUDA with torch's sparse CSR. Moves with the module (``.to(device)``).
    """

    def __init__(self, matrix: sp.spmatrix):
        super().__init__()
        self.csr = sp.csr_matrix(matrix, dtype=np.float32)
        self.register_buffer("indptr", torch.from_numpy(self.csr.indptr.astype(np.int64)), persistent=False)
        self.register_buffer("indices", torch.from_numpy(self.csr.indices.astype(np.int64)), persistent=False)
        self.register_buffer("values", torch.from_numpy(self.csr.data), persistent=False)
        self._cuda: torch.Tensor | None = None

    @property
    def shape(self):
        return self.csr.shape

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(self.csr @ x.detach().numpy()))
        if self._cuda is None or self._cuda.device != x.device:
            self._cuda = torch.sparse_csr_tensor(self.indptr, self.indices, self.values, size=self.shape)
        return self._cuda @ x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SymmetricMatmul.apply(x, self)


class _SymmetricMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, graph):
        ctx.graph = graph
        return graph._matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.graph._matmul(grad), None


def bipartite_norm_adj(train: sp.spmatrix) -> "SymmetricGraph":
    """D^-1/2 A D^-1/2 of the (users + items) bipartite training graph (MMRec's, +1e-7 in D)."""
    train = sp.csr_matrix(train, dtype=np.float32)
    n_users, n_items = train.shape
    adj = sp.bmat([[None, train], [train.T, None]], format="csr", dtype=np.float32)
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(axis=1)).ravel() + 1e-7
    d = sp.diags(deg ** -0.5)
    return SymmetricGraph(d @ adj @ d)


def lightgcn_layers(adj: "SymmetricGraph", emb: torch.Tensor, layers: int, reduce: str = "sum") -> torch.Tensor:
    out = [emb]
    for _ in range(layers):
        emb = adj(emb)
        out.append(emb)
    stacked = torch.stack(out, 0)
    return stacked.sum(0) if reduce == "sum" else stacked.mean(0)


def edge_matmul(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``A @ x`` for the sparse A with entries ``A[rows, cols] = vals`` (differentiable in vals and x).

    ``F.embedding`` gathers with a deterministic backward (see :func:`mllmrec.models.layers.rows`).
    """
    msg = F.embedding(cols, x) * vals.unsqueeze(1)
    return torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, rows, msg)


class EdgeGraph(nn.Module):
    """A fixed sparse matrix (any shape, not necessarily symmetric) as a module: ``graph(x) = A @ x``."""

    def __init__(self, matrix: sp.spmatrix):
        super().__init__()
        coo = sp.coo_matrix(matrix, dtype=np.float32)
        self.n = coo.shape[0]
        self.register_buffer("rows", torch.from_numpy(coo.row.astype(np.int64)), persistent=False)
        self.register_buffer("cols", torch.from_numpy(coo.col.astype(np.int64)), persistent=False)
        self.register_buffer("vals", torch.from_numpy(coo.data.copy()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return edge_matmul(self.rows, self.cols, self.vals, x, self.n)

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.vals.cpu().numpy(), (self.rows.cpu().numpy(), self.cols.cpu().numpy())),
                             shape=(self.n, self.n))


def normalize_edges(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """The values of D^-1/2 S D^-1/2 for S given by its edges (D: row sums; empty rows stay 0)."""
    deg = torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add(0, rows, vals)
    inv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    return inv[rows] * vals * inv[cols]


class CSRGraph(nn.Module):
    """A fixed sparse matrix A of any shape (not necessarily symmetric) applied as ``A @ x`` with
    autograd (grad = A^T @ grad), on the CSR kernels of :class:`SymmetricGraph` (SciPy on CPU, torch
    sparse CSR on CUDA); A^T is stored once. Faster than :class:`EdgeGraph` for a large fixed matrix."""

    def __init__(self, matrix: sp.spmatrix):
        super().__init__()
        self.a = SymmetricGraph(matrix)
        self.a_t = SymmetricGraph(sp.csr_matrix(matrix).T)

    @property
    def shape(self):
        return self.a.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CSRMatmul.apply(x, self.a, self.a_t)

    def to_scipy(self) -> sp.csr_matrix:
        return self.a.csr.copy()


class _CSRMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, a_t):
        ctx.a_t = a_t
        return a._matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.a_t._matmul(grad), None, None
