"""LGMRec against a dense re-derivation of its equations, and learning on planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from gradients import distinct_settings
from mm_planted import planted_data, val_recall_before_after
from model_inputs import inputs_of

from mllmrec.models.base import Inputs, adam

N_USERS, N_ITEMS = 5, 7
# distinct within each kind: a swap of two layer counts or of the two loss weights changes the result
SETTINGS = distinct_settings(layers={"ui_layers": 2, "mm_layers": 3, "hyper_layers": 1},
                             weights={"cl_weight": 0.5, "reg_weight": 0.1})


@pytest.fixture
def case():
    rng = np.random.default_rng(11)
    train = np.zeros((N_USERS, N_ITEMS), np.float32)
    for u, items in enumerate([[0, 1, 2], [1, 3], [2, 4, 5], [0, 5, 6], [3, 6]]):
        train[u, items] = 1
    mods = {"text": rng.standard_normal((N_ITEMS, 6)).astype(np.float32),
            "image": rng.standard_normal((N_ITEMS, 4)).astype(np.float32)}
    from mllmrec.models.lgmrec import LGMRecModule

    torch.manual_seed(0)
    model = LGMRecModule(inputs_of(sp.csr_matrix(train), modalities=mods), d=4, hyper_num=3, alpha=0.3, **SETTINGS)
    batch = (torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 3, 4, 6, 3, 2]), torch.tensor([4, 0, 1, 2, 5, 6]))
    return train, mods, model, batch


def nt(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def dense_lgmrec(train, mods, p):
    """The paper/MMRec equations, densely, float64 (evaluation: noiseless softmax memberships)."""
    r = nt(train)
    a = torch.zeros(N_USERS + N_ITEMS, N_USERS + N_ITEMS, dtype=torch.float64)
    a[:N_USERS, N_USERS:], a[N_USERS:, :N_USERS] = r, r.T
    deg = a.sum(1) + 1e-7
    a = a / torch.sqrt(torch.outer(deg, deg))
    ego = torch.cat([p["user_emb"], p["item_emb"]])
    cge = (ego + a @ ego + a @ a @ ego) / 3  # ui_layers = 2
    norm = torch.nn.functional.normalize
    local, ghe, hyper = cge.clone(), 0, {}
    for m, f in mods.items():
        items = nt(f) @ p[f"trs.{m}"]
        users = (r @ items) / (r.sum(1, keepdim=True) + 1e-7)
        local = local + norm(a @ a @ a @ torch.cat([users, items]))  # mm_layers = 3
        logits = nt(f) @ p[f"hyper.{m}"]
        h_i, h_u = torch.softmax(logits / 0.2, 1), torch.softmax((r @ logits) / 0.2, 1)
        lat = h_i.T @ cge[N_USERS:]
        hyper[m] = (h_u @ lat, h_i @ lat)
        ghe = ghe + torch.cat(hyper[m])
    out = local + 0.3 * norm(ghe)
    return out[:N_USERS], out[N_USERS:], hyper


def test_lgmrec_forward_and_loss_match_the_dense_equations(case):
    train, mods, model, (users, pos, neg) = case
    model.eval()
    p = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    h_u, h_i, hyper = dense_lgmrec(train, mods, p)
    got_u, got_i = model.representations()
    torch.testing.assert_close(got_u.double(), h_u, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_i.double(), h_i, rtol=1e-4, atol=1e-5)
    u, i, j = h_u[users], h_i[pos], h_i[neg]
    bpr = -torch.nn.functional.logsigmoid((u * i).sum(1) - (u * j).sum(1)).mean()
    reg = (u.norm() + i.norm() + j.norm()) / len(users)

    def nce(x, y, all_y):
        x, y, all_y = (torch.nn.functional.normalize(t) for t in (x, y, all_y))
        return -torch.log(torch.exp((x * y).sum(1) / 0.2) / torch.exp(x @ all_y.T / 0.2).sum(1)).sum()

    (uv, iv), (ut, it) = hyper["image"], hyper["text"]
    hcl = nce(uv[users], ut[users], ut) + nce(iv[pos], it[pos], it)
    expected = bpr + SETTINGS["reg_weight"] * reg + SETTINGS["cl_weight"] * hcl
    got = model.batch_loss(users, pos, neg)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    got.backward()  # the gradients too: a stop-gradient in one branch leaves the values unchanged
    expected.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.double(), p[name].grad, rtol=1e-3, atol=1e-6, msg=name)


def test_training_memberships_are_noisy_distributions(case):
    _, mods, model, _ = case
    model.train()
    logits = torch.from_numpy(mods["text"]) @ model.hyper["text"]
    a, b = model.memberships(logits), model.memberships(logits)
    torch.testing.assert_close(a.sum(1), torch.ones(N_ITEMS))
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.memberships(logits), model.memberships(logits))


def test_learns_planted_structure():
    from mllmrec.models.lgmrec import LGMRecModule

    # uninformative features: even so, its untrained propagation of random projections over the
    # user-item graph already finds most of the blocks (about 0.9); training must close the gap
    data, mods = planted_data(signal=0.0)
    torch.manual_seed(0)
    model = LGMRecModule(Inputs(data, modalities=mods), adam(lr=0.01), d=16)
    before, after = val_recall_before_after(model, data)
    assert after > before + 0.05 and after > 0.95, (before, after)
