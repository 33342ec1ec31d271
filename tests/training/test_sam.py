"""SAM / ASAM: the first step's perturbation and the full step against hand computations (numpy)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from skullrec.training.sam import SAM
from conftest import linear_model

torch.set_num_threads(1)


def _problem(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 3))
    t = rng.normal(size=(6, 2))
    W = rng.normal(size=(2, 3))
    b = rng.normal(size=2)
    return x, t, W, b


def _grads_by_hand(x, t, W, b):
    """Least squares L = mean((x W^T + b - t)^2): dL/dW = 2/n r^T x, dL/db = 2/n sum r, n = r.size."""
    r = x @ W.T + b - t
    n = r.size
    return 2 / n * r.T @ x, 2 / n * r.sum(0)


def _loss(m, x, t):
    return ((m(torch.from_numpy(x)) - torch.from_numpy(t)) ** 2).mean()


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_perturbation_matches_hand_computation(adaptive):
    x, t, W, b = _problem(0)
    rho, eta, lr = 0.07, 0.01, 0.1
    m = linear_model(W, b)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=lr)
    _loss(m, x, t).backward()
    opt.first_step(zero_grad=True)
    gW, gb = _grads_by_hand(x, t, W, b)
    # SAM: T = 1; ASAM: T = |w| + eta element-wise. e = rho T^2 g / ||T g|| over all parameters together.
    tW, tb = (np.abs(W) + eta, np.abs(b) + eta) if adaptive else (np.ones_like(W), np.ones_like(b))
    norm = np.sqrt(((tW * gW) ** 2).sum() + ((tb * gb) ** 2).sum())
    eW, eb = rho * tW**2 * gW / norm, rho * tb**2 * gb / norm
    np.testing.assert_allclose(m.weight.detach().numpy(), W + eW, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.bias.detach().numpy(), b + eb, rtol=1e-12, atol=1e-14)
    assert m.weight.grad is None or not m.weight.grad.any()  # zero_grad=True
    if not adaptive:
        assert np.sqrt((eW**2).sum() + (eb**2).sum()) == pytest.approx(rho, rel=1e-12)  # on the rho-sphere

    # Second step: back to w, then the base optimizer (SGD) with the gradient taken at w + e.
    _loss(m, x, t).backward()
    opt.second_step(zero_grad=True)
    gW2, gb2 = _grads_by_hand(x, t, W + eW, b + eb)
    np.testing.assert_allclose(m.weight.detach().numpy(), W - lr * gW2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.bias.detach().numpy(), b - lr * gb2, rtol=1e-12, atol=1e-14)


def test_asam_perturbation_is_relative_to_weight_size():
    """ASAM's ball is measured in units of |w| + eta: with eta = 0, scaling w by c scales e by c
    (for a gradient scaled by 1/c, as a reparameterisation does), while SAM's e does not follow."""
    x, t, W, b = _problem(1)
    out = {}
    for adaptive in (False, True):
        for c in (1.0, 4.0):
            m = linear_model(W * c, b * c)
            opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=0.0, lr=0.1)
            with torch.no_grad():
                m.weight.grad = torch.from_numpy(_grads_by_hand(x, t, W, b)[0] / c)
                m.bias.grad = torch.from_numpy(_grads_by_hand(x, t, W, b)[1] / c)
            opt.first_step()
            out[adaptive, c] = m.weight.detach().numpy() - W * c
    np.testing.assert_allclose(out[True, 4.0], 4.0 * out[True, 1.0], rtol=1e-12)
    assert not np.allclose(out[False, 4.0], 4.0 * out[False, 1.0])


def test_step_with_closure_equals_two_explicit_steps_and_state_round_trips():
    x, t, W, b = _problem(2)
    a, c = linear_model(W, b), linear_model(W, b)
    opt_a = SAM(a.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2)
    opt_c = SAM(c.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2)
    for _ in range(3):
        _loss(a, x, t).backward()
        opt_a.first_step(zero_grad=True)
        _loss(a, x, t).backward()
        opt_a.second_step(zero_grad=True)

        _loss(c, x, t).backward()
        opt_c.step(lambda: _loss(c, x, t).backward() or torch.zeros(()))
        opt_c.zero_grad()
    assert torch.equal(a.weight, c.weight) and torch.equal(a.bias, c.bias)

    # The state dict carries Adam's moments; a restored optimizer continues identically.
    sd = copy.deepcopy(opt_a.state_dict())  # as if read back from a file: no tensors shared with opt_a
    assert any("exp_avg" in s for s in sd["state"].values())
    d = linear_model(a.weight.detach().numpy(), a.bias.detach().numpy())
    opt_d = SAM(d.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2)
    opt_d.load_state_dict(sd)
    for m, opt in ((a, opt_a), (d, opt_d)):
        _loss(m, x, t).backward()
        opt.first_step(zero_grad=True)
        _loss(m, x, t).backward()
        opt.second_step(zero_grad=True)
    assert torch.equal(a.weight, d.weight) and torch.equal(a.bias, d.bias)
    assert opt_d.param_groups[0]["lr"] == 1e-2 and opt_d.param_groups[0]["rho"] == 0.05


def test_invalid_arguments():
    m = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="rho"):
        SAM(m.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
