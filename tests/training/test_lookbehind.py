"""Lookbehind-SAM: one step against a hand computation (numpy: least-squares gradients, Adam by hand)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from skullrec.training.lookbehind import Lookbehind
from conftest import linear_model

torch.set_num_threads(1)


def _problem(seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), rng.normal(size=(2, 3)), rng.normal(size=2)


def _grad(x, t, W, b):
    """L = mean((x W^T + b - t)^2): dL/dW = 2/n r^T x, dL/db = 2/n sum_rows r, n = r.size."""
    r = x @ W.T + b - t
    return 2 / r.size * r.T @ x, 2 / r.size * r.sum(0)


class _AdamByHand:
    """torch.optim.Adam's documented update (bias-corrected moments, eps outside the square root)."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.b1, self.b2), self.eps, self.t, self.m, self.v = lr, betas, eps, 0, None, None

    def step(self, w, g):
        if self.m is None:
            self.m, self.v = [np.zeros_like(a) for a in w], [np.zeros_like(a) for a in w]
        self.t += 1
        out = []
        for i, (wi, gi) in enumerate(zip(w, g)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * gi
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * gi**2
            mhat, vhat = self.m[i] / (1 - self.b1**self.t), self.v[i] / (1 - self.b2**self.t)
            out.append(wi - self.lr * mhat / (np.sqrt(vhat) + self.eps))
        return out


def _lookbehind_by_hand(x, t, W, b, rho, k, alpha, adam):
    """The paper's update written out: accumulating ascents p_i, fast weights by the base optimizer, interpolation."""
    phi = [W, b]
    p, fast = [W.copy(), b.copy()], [W.copy(), b.copy()]
    g = _grad(x, t, *p)
    first = None
    for i in range(k):
        norm = np.sqrt(sum((gi**2).sum() for gi in g))
        p = [pi + rho * gi / norm for pi, gi in zip(p, g)]
        g = _grad(x, t, *p)
        fast = adam.step(fast, g)
        if i == 0:
            first = fast
    if alpha == "adaptive":
        def cos(a, c):
            return (a * c).sum() / (np.linalg.norm(a) * np.linalg.norm(c))
        alphas = [(1 + cos(f1 - s, fk - s)) / 2 for f1, fk, s in zip(first, fast, phi)]
    else:
        alphas = [alpha, alpha]
    return [s + a * (f - s) for s, f, a in zip(phi, fast, alphas)]


def _closure(m, opt, x, t):
    def closure():
        opt.zero_grad()
        loss = ((m(torch.from_numpy(x)) - torch.from_numpy(t)) ** 2).mean()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("k, alpha", [(2, 0.5), (3, 0.2), (2, "adaptive")])
def test_two_steps_match_hand_computation_with_adam(k, alpha):
    x, t, W, b = _problem(1)
    rho, lr = 0.3, 0.05  # large enough that every term (ascent, Adam, interpolation) moves the weights visibly
    m = linear_model(W, b)
    opt = Lookbehind(m.parameters(), torch.optim.Adam, rho=rho, k=k, alpha=alpha, lr=lr)
    adam = _AdamByHand(lr)
    w = [W, b]
    for _ in range(2):  # the second step checks that Adam's moments carry over (k base steps per batch)
        closure = _closure(m, opt, x, t)
        closure()
        opt.step(closure)
        w = _lookbehind_by_hand(x, t, *w, rho, k, alpha, adam)
        np.testing.assert_allclose(m.weight.detach().numpy(), w[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.bias.detach().numpy(), w[1], rtol=1e-10, atol=1e-12)
    assert opt.base_optimizer.state[m.weight]["step"].item() == 2 * k


def test_k1_alpha1_is_sam():
    """k = 1, alpha = 1 reduces to one SAM step (skullrec.training.sam with the same base optimizer)."""
    from skullrec.training.sam import SAM

    x, t, W, b = _problem(2)
    m1, m2 = linear_model(W, b), linear_model(W, b)
    lb = Lookbehind(m1.parameters(), torch.optim.SGD, rho=0.1, k=1, alpha=1.0, lr=0.1)
    sam = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    c1 = _closure(m1, lb, x, t)
    c1()
    lb.step(c1)
    c2 = _closure(m2, sam, x, t)
    c2()
    sam.step(c2)
    np.testing.assert_allclose(m1.weight.detach().numpy(), m2.weight.detach().numpy(), rtol=1e-12)
    assert not np.allclose(m1.weight.detach().numpy(), W)


def test_state_dict_is_the_base_optimizers():
    x, t, W, b = _problem(3)
    m = linear_model(W, b)
    opt = Lookbehind(m.parameters(), torch.optim.Adam, lr=0.01)
    c = _closure(m, opt, x, t)
    c()
    opt.step(c)
    m2 = copy.deepcopy(m)
    opt2 = Lookbehind(m2.parameters(), torch.optim.Adam, lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a state_dict shares its tensors with the optimizer
    for o, mm in ((opt, m), (opt2, m2)):
        c = _closure(mm, o, x, t)
        c()
        o.step(c)
    np.testing.assert_array_equal(m.weight.detach().numpy(), m2.weight.detach().numpy())


@pytest.mark.parametrize("kw", [{"rho": 0}, {"k": 0}, {"alpha": 0}, {"alpha": 1.5}, {"alpha": "fast"}])
def test_bad_hyperparameters_refused(kw):
    with pytest.raises(ValueError):
        Lookbehind(nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.1, **kw)
