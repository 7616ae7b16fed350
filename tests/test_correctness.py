"""Tests that fail when the model is wrong: losses by hand, the CPU training path against a full
forward, the sparse graph op's gradient, masking and negative sampling through the data module,
and "w/o GCN_II". Each expectation is computed here, independently of the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from model_inputs import inputs_of

from mllmrec.datamodule import RecDataModule, TripletEpochs
from mllmrec.metrics import EvalSpec

METRICS = EvalSpec.default().names
from mllmrec.models.base import RankingModule
from mllmrec.models.bpr import BPRModule
from mllmrec.models.layers import SymmetricGraph, bipartite_norm_adj, lightgcn_layers
from mllmrec.models.lightgcn import LightGCNModule
from mllmrec.models.losses import bpr_logsigmoid, bpr_sigmoid_eps, emb_reg
from mllmrec.models.mllmrec import MLLMRecModule


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hand_bpr(u, p, n, eps=0.0):
    """mean_b -log(eps + 1 / (1 + exp(-(u.p - u.n)))) with Python floats, row by row."""
    total = 0.0
    for ub, pb, nb in zip(u.tolist(), p.tolist(), n.tolist()):
        x = sum(a * b for a, b in zip(ub, pb)) - sum(a * b for a, b in zip(ub, nb))
        total += -math.log(eps + 1.0 / (1.0 + math.exp(-x)))
    return total / len(u)


# ---------------------------------------------------------------- losses by hand
def test_bpr_loss_by_hand():
    u, p, n = _rand(7, 5, seed=1), _rand(7, 5, seed=2), _rand(7, 5, seed=3)
    assert float(bpr_logsigmoid(u, p, n)) == pytest.approx(_hand_bpr(u, p, n), rel=1e-12)
    # a positive scored above the negative costs less than log 2, below it more
    one = torch.ones(1, 1, dtype=torch.float64)
    assert float(bpr_logsigmoid(one, 2 * one, one)) == pytest.approx(math.log(1 + math.exp(-1)))
    assert float(bpr_logsigmoid(one, one, 2 * one)) == pytest.approx(math.log(1 + math.exp(1)))


def test_mmrec_bpr_and_emb_loss_by_hand():
    pos, neg = _rand(6, seed=4), _rand(6, seed=5)
    expected = sum(-math.log(1e-10 + 1 / (1 + math.exp(-(a - b)))) for a, b in zip(pos.tolist(), neg.tolist())) / 6
    assert float(bpr_sigmoid_eps(pos, neg)) == pytest.approx(expected, rel=1e-12)
    # MMRec's EmbLoss(norm=2): sum of the (not squared) Frobenius norms / batch size
    a, b = _rand(4, 3, seed=6), _rand(4, 3, seed=7)
    frob = [math.sqrt(sum(x * x for row in t.tolist() for x in row)) for t in (a, b)]
    assert float(emb_reg(a, b)) == pytest.approx(sum(frob) / 4, rel=1e-12)


def test_bpr_baseline_loss_by_hand():
    model = BPRModule(inputs_of(shape=(5, 6)), d=3, reg_weight=0.25).double()
    users, pos, neg = torch.tensor([0, 3, 3, 4]), torch.tensor([1, 2, 5, 0]), torch.tensor([4, 4, 0, 2])
    uw, iw = model.user_emb.weight.detach(), model.item_emb.weight.detach()
    u, p, n = uw[users], iw[pos], iw[neg]
    reg = sum(math.sqrt(float((t * t).sum())) for t in (u, p, n)) / 4
    expected = _hand_bpr(u, p, n, eps=1e-10) + 0.25 * reg
    assert float(model.batch_loss(users, pos, neg).detach()) == pytest.approx(expected, rel=1e-9)


def test_lightgcn_baseline_loss_by_hand():
    train = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=np.float32)
    model = LightGCNModule(inputs_of(sp.csr_matrix(train)), d=2, layers=2,
                           reg_weight=0.5).double()
    # dense D^-1/2 A D^-1/2 of the bipartite graph (MMRec adds 1e-7 to the degrees), mean of layers 0..2
    adj = np.block([[np.zeros((3, 3)), train], [train.T, np.zeros((4, 4))]])
    d = (adj.sum(1) + 1e-7) ** -0.5
    norm = d[:, None] * adj * d[None, :]
    e0 = np.concatenate([model.user_emb.detach().numpy(), model.item_emb.detach().numpy()])
    final = (e0 + norm @ e0 + norm @ norm @ e0) / 3
    users, pos, neg = [0, 2, 1], [2, 3, 1], [1, 2, 3]
    u, p, n = (torch.from_numpy(x) for x in (final[users], final[[3 + i for i in pos]], final[[3 + i for i in neg]]))
    reg = sum(np.linalg.norm(x) for x in (e0[users], e0[[3 + i for i in pos]], e0[[3 + i for i in neg]])) / 3
    expected = _hand_bpr(u, p, n, eps=1e-10) + 0.5 * reg
    got = model.batch_loss(torch.tensor(users), torch.tensor(pos), torch.tensor(neg))
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- CPU training path
def test_deduplicated_batch_loss_equals_a_full_forward():
    """The CPU path runs the towers on the batch's distinct users/items only: same loss, same grads."""
    torch.manual_seed(0)
    model = MLLMRecModule(inputs_of(shape=(9, 11), user_features=_rand(9, 12, seed=8).float(),
                                    item_features=_rand(11, 12, seed=9).float()), d=4, d1=8)
    users = torch.tensor([0, 3, 3, 8, 0, 5, 3])  # repeated users
    pos = torch.tensor([1, 1, 4, 10, 7, 4, 2])  # repeated items, and an item both positive and negative
    neg = torch.tensor([4, 6, 1, 0, 9, 9, 2])
    params = [p for p in model.parameters()]

    loss = model.batch_loss(users, pos, neg)
    grads = torch.autograd.grad(loss, params)

    # reference: both towers over ALL users and items, then the BPR formula written out
    h_u = model.user_tower(model.user_feat)
    h_i = model.item_tower(model.item_feat)
    diff = (h_u[users] * h_i[pos]).sum(1) - (h_u[users] * h_i[neg]).sum(1)
    ref = torch.log1p(torch.exp(-diff)).mean()
    ref_grads = torch.autograd.grad(ref, params)

    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- sparse symmetric op
def test_symmetric_graph_gradcheck():
    rng = np.random.default_rng(3)
    m = sp.random(12, 12, density=0.3, random_state=rng, dtype=np.float64)
    graph = SymmetricGraph(m + m.T)
    x = _rand(12, 3, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(graph, (x,), eps=1e-6, atol=1e-5)
    # the forward is the matrix product itself
    dense = torch.from_numpy((m + m.T).toarray().astype(np.float32)).double()
    torch.testing.assert_close(graph(x), dense @ x)


def test_lightgcn_layers_gradcheck_over_the_bipartite_graph():
    train = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32))
    adj = bipartite_norm_adj(train)
    x = _rand(5, 2, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: lightgcn_layers(adj, e, 2), (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- negative sampling in the epochs
@pytest.mark.parametrize("seed", [0, 1, 2, 999])
def test_epoch_negatives_never_hit_a_training_item(tiny_data, seed):
    train = tiny_data.train_matrix.toarray() > 0
    n_train = int(train.sum())
    dm = RecDataModule(batch_size=17, seed=seed).attach(tiny_data)
    dm.setup()
    epochs = TripletEpochs(dm)
    draws = 0
    for _ in range(40):  # 40 epochs x ~230 training pairs
        seen = np.zeros_like(train, dtype=int)
        for users, pos, neg in epochs:
            u, p, n = users.numpy(), pos.numpy(), neg.numpy()
            assert not train[u, n].any(), "a negative is one of the user's training items"
            assert train[u, p].all()
            np.add.at(seen, (u, p), 1)
            draws += len(u)
        assert (seen == train).all()  # each training pair once per epoch
    assert draws == 40 * n_train


# ---------------------------------------------------------------- evaluation masks training items
class FixedScores(RankingModule):
    """Scores from fixed representations: no training."""

    def __init__(self, h_u: torch.Tensor, h_i: torch.Tensor):
        super().__init__()
        self.h_u, self.h_i = h_u, h_i

    def representations(self):
        return self.h_u, self.h_i


def test_evaluation_never_ranks_a_training_item(tiny_data):
    """Each user scores its training items 1, its validation item 0.5 and everything else 0: the
    validation item only reaches rank 1 if every training item is taken out of the ranking."""
    import pytorch_lightning as pl

    from mllmrec.data import VALID

    train = tiny_data.train_matrix.toarray()
    valid = np.zeros_like(train)
    u, i = tiny_data.pairs(VALID)
    valid[u, i] = 1.0
    assert (train.sum(1) >= 1).all() and (valid.sum(1) == 1).all() and not (train * valid).any()
    model = FixedScores(torch.from_numpy(train + 0.5 * valid).float(), torch.eye(tiny_data.n_items))
    dm = RecDataModule(seed=0).attach(tiny_data)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    out = trainer.validate(model, datamodule=dm, verbose=False)[0]
    for m in METRICS:
        assert out[f"val/{m}"] == pytest.approx(1.0), m  # rank 1 for every user
    # the premise: unmasked, a training item (score 1) would take rank 1 for every user
    assert ((train + 0.5 * valid).argmax(1) != valid.argmax(1)).all()


# ---------------------------------------------------------------- "w/o GCN_II"
def test_without_gcn_ii_item_star_is_the_input_features(compose_cfg, tiny_data):
    from mllmrec.cache import ArtifactCache
    from mllmrec.stages import graph

    cfg = compose_cfg("variant=wo_gcn_ii")
    assert cfg.graph.layers == 0
    features = np.random.default_rng(4).standard_normal((tiny_data.n_items, 8)).astype(np.float32)
    art = graph.run(cfg.graph, tiny_data, ArtifactCache(cfg.paths.cache_dir, "tiny"), features, "fake-features")
    star = graph.load_item_star(art)
    assert star.dtype == features.dtype
    np.testing.assert_array_equal(star, features)  # exactly, not approximately
