"""LATTICE against a dense re-derivation of its equations (MMRec's dense code path), the learned
graph's gradient schedule, the refinement switch, and learning on planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mm_planted import hand_case, planted_data, val_recall_before_after
from model_inputs import inputs_of

from mllmrec.models.base import Inputs, adam

N_USERS, N_ITEMS, K = 5, 7, 3


@pytest.fixture
def hand():
    return hand_case(7)


def lattice(hand, **kw):
    from mllmrec.models.lattice import LATTICEModule

    torch.manual_seed(0)
    return LATTICEModule(inputs_of(hand[0], modalities={"text": hand[1]}), d=4, feat_embed_dim=4, knn_k=K, **kw)


def dense_weighted_knn_laplacian(x: torch.Tensor) -> torch.Tensor:
    """MMRec utils: build_sim -> build_knn_neighbourhood -> compute_normalized_laplacian, densely."""
    xn = x / x.norm(dim=-1, keepdim=True)
    sim = xn @ xn.T
    val, ind = torch.topk(sim, K, dim=-1)
    adj = torch.zeros_like(sim).scatter_(-1, ind, val)
    d = adj.sum(-1).pow(-0.5)
    return torch.diag(d) @ adj @ torch.diag(d)


def dense_ui(train: np.ndarray) -> torch.Tensor:
    a = np.block([[np.zeros((N_USERS, N_USERS)), train], [train.T, np.zeros((N_ITEMS, N_ITEMS))]]) + np.eye(N_USERS + N_ITEMS)
    return torch.from_numpy(a / a.sum(1, keepdims=True)).float()


def dense_forward(model, train, feats):
    p = {k: v.detach().clone() for k, v in model.state_dict().items()}
    learned = dense_weighted_knn_laplacian(p["feat.text"] @ p["trs.text.weight"].T + p["trs.text.bias"])
    original = dense_weighted_knn_laplacian(torch.from_numpy(feats))
    h = (0.1 * learned + 0.9 * original) @ p["item_emb"]
    a = dense_ui(train.toarray())
    ego = torch.cat([p["user_emb"], p["item_emb"]])
    mean = (ego + a @ ego + a @ (a @ ego)) / 3
    return mean[:N_USERS], mean[N_USERS:] + torch.nn.functional.normalize(h, dim=1)


def test_lattice_forward_and_loss_match_the_dense_equations(hand):
    train, feats, (users, pos, neg) = hand
    model = lattice(hand, reg_weight=0.3)
    with torch.no_grad():
        model.trs.text.bias.normal_()
    exp_u, exp_i = dense_forward(model, train, feats)
    got_u, got_i = model.representations()
    torch.testing.assert_close(got_u, exp_u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_i, exp_i, rtol=1e-4, atol=1e-6)
    u, i, j = exp_u[users], exp_i[pos], exp_i[neg]
    bpr = -torch.nn.functional.logsigmoid((u * i).sum(1) - (u * j).sum(1)).mean()
    reg = 0.5 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / len(users)
    assert model.batch_loss(users, pos, neg).item() == pytest.approx((bpr + 0.3 * reg).item(), rel=1e-5)


def test_learned_graph_gets_gradient_on_the_first_batch_of_an_epoch_only(hand):
    _, _, (users, pos, neg) = hand
    model = lattice(hand)
    model.on_train_epoch_start()
    model.batch_loss(users, pos, neg).backward()
    assert model.trs.text.weight.grad is not None and model.trs.text.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.batch_loss(users, pos, neg).backward()  # same epoch: the graph is reused, detached
    assert model.trs.text.weight.grad is None and model.item_emb.grad.abs().sum() > 0


def test_refine_replaces_the_original_graph_only(hand):
    from mllmrec.item_graph import cooccurrence_topk, knn_candidates, refine_item_graph, sym_normalize

    train, feats, _ = hand
    cfg = {"refine": True, "alpha": 0.3, "k_c": 2, "denoise": True, "enhance": True}
    vanilla, refined = lattice(hand), lattice(hand, **cfg)
    idx, sim = knn_candidates(feats, K, progress=False)
    expected = sym_normalize(refine_item_graph(idx, sim, cooccurrence_topk(train, 2, progress=False), 0.3))
    np.testing.assert_allclose(refined.original["text"].to_scipy().toarray(), expected.toarray(), rtol=1e-6)
    assert not np.allclose(vanilla.original["text"].to_scipy().toarray(), expected.toarray())
    for (k, v0), (_, v1) in zip(vanilla.state_dict().items(), refined.state_dict().items()):
        torch.testing.assert_close(v0, v1, msg=k)  # same parameters; the learned part is the same function
    np.testing.assert_array_equal(vanilla.ui_adj.to_scipy().toarray(), refined.ui_adj.to_scipy().toarray())


def test_learns_planted_structure():
    from mllmrec.models.lattice import LATTICEModule

    data, mods = planted_data()
    torch.manual_seed(0)
    model = LATTICEModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16, feat_embed_dim=16, knn_k=5)
    before, after = val_recall_before_after(model, data)
    assert after > before + 0.2, (before, after)
