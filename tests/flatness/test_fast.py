"""Fast FAM estimators (skullrec.flatness.fast) against plain autograd, in float64 on fresh random inputs.

Stated bounds (docs/explanation/performance.md):
* "outspace" is exact: value and full gradient equal autograd's for the same probes to 1e-9 (relative).
* "fd" (frozen-kink second difference, step eps = FD_EPS * rms(z)): bias O(eps^2). At FD_EPS = 0.03 the
  per-probe value is within 1 % and the full gradient (all parameters) within 3 % of autograd's for
  the same probes; quartering eps shrinks both errors at least 8-fold (O(eps^2) would give 16-fold).
* "fd-half": the average over all subsets equals the whole-batch "fd" value and gradient (so a
  uniformly random subset is unbiased), and the Hutchinson mean over many (probe, subset) draws equals
  the exact trace from the dense Hessian within 3 standard errors plus the FD bias bound.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from skullrec.config import FamConfig, ModelConfig
from skullrec.flatness import fast as ff
from skullrec.flatness.hessian import exact_trace, fam_term, rademacher
from skullrec.flatness.regularizer import FamRegularizer
from skullrec.nets.autoencoder import loss_function
from conftest import perturbed_model_and_batch

torch.set_num_threads(1)

# The real layer types; 4 stride-2 stages at 32^3 leave a 2^3 x 8 bottleneck, so decodeL is 64 x 8.
SMALL = ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)
# For the dense Hessian: decodeL 32 x 2 (64 weights).
TINY = ModelConfig(size=16, channels=[4, 4, 4], strides=[2, 2, 2], latent_size=2)


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _autograd(model, x, y, probes):
    """Plain-autograd mean v^T H v over the probes and its full gradient w.r.t. every parameter."""
    loss = loss_function()(model(x), y)
    tr = fam_term(loss, model.decodeL.weight, probes=[probes], gradient="full", trace="signed").trace
    # fam_term's trace is detached; rebuild the differentiable mean v^T H v with the same probes.
    (g,) = torch.autograd.grad(loss, model.decodeL.weight, create_graph=True)
    q = sum((torch.autograd.grad((g * v).sum(), model.decodeL.weight, create_graph=True)[0] * v).sum() for v in probes) / len(probes)
    assert torch.allclose(q.detach(), tr)
    return q.detach(), _flat(torch.autograd.grad(q, list(model.parameters())))


def _fd(model, x, y, probes, idx=None, eps=ff.FD_EPS):
    taps = ff.attach_taps(model)
    logits = model(x)  # recorded by the taps
    q = ff.fd_quadratic_form(model, taps, taps.latent, taps.z, logits, y, loss_function(), probes, idx, eps=eps)
    taps.clear()
    return q.detach(), _flat(torch.autograd.grad(q, list(model.parameters())))


def test_outspace_is_exact():
    model, x, y, gen = perturbed_model_and_batch(SMALL, 2, seed=int(torch.randint(0, 2**31, ()).item()))
    probes = rademacher(2, model.decodeL.weight, gen)
    q_ref, g_ref = _autograd(model, x, y, probes)
    latent = model.encode(x)
    z = model.decodeL(latent)
    loss = loss_function()(model.decode_features(z), y)
    q = ff.outspace_quadratic_form(z, latent, loss, probes)
    g = _flat(torch.autograd.grad(q, list(model.parameters())))
    q = q.detach()
    assert abs(float(q - q_ref)) <= 1e-9 * abs(float(q_ref))
    assert _rel(g, g_ref) <= 1e-9


def test_fd_value_and_gradient_match_autograd_with_eps_squared_bias():
    seed = int(torch.randint(0, 2**31, ()).item())
    model, x, y, gen = perturbed_model_and_batch(SMALL, 2, seed)
    probes = rademacher(1, model.decodeL.weight, gen)
    q_ref, g_ref = _autograd(model, x, y, probes)
    q, g = _fd(model, x, y, probes)
    # Relative to |v^T H v|, floored at 0.01 (a typical size here) for probes where it is close to 0.
    scale = max(abs(float(q_ref)), 1e-2)
    err_q, err_g = abs(float(q - q_ref)) / scale, _rel(g, g_ref)
    assert err_q <= 1e-2, (seed, err_q)
    assert err_g <= 3e-2, (seed, err_g)
    # O(eps^2): a 4x smaller step shrinks the error >= 8x (down to the float64 rounding floor).
    q4, g4 = _fd(model, x, y, probes, eps=ff.FD_EPS / 4)
    assert abs(float(q4 - q_ref)) / scale <= max(err_q / 8, 1e-9), seed
    assert _rel(g4, g_ref) <= max(err_g / 8, 1e-8), seed


def test_fd_needs_frozen_kinks():
    """Without the frozen activation pattern the second difference sees the kinks (why they are frozen)."""
    model, x, y, gen = perturbed_model_and_batch(SMALL, 2, seed=3)
    probes = rademacher(1, model.decodeL.weight, gen)
    q_ref, _ = _autograd(model, x, y, probes)
    with torch.no_grad():
        latent = model.encode(x)
        z = model.decodeL(latent)
        u = latent @ probes[0].T
        step = ff.FD_EPS * z.pow(2).mean().sqrt()
        L = lambda zz: loss_function()(model.decode_features(zz), y)  # noqa: E731
        plain = (L(z + step * u) - 2 * L(z) + L(z - step * u)) / step**2
    frozen, _ = _fd(model, x, y, probes)
    err_frozen = abs(float(frozen - q_ref))
    assert abs(float(plain - q_ref)) > 10 * err_frozen


def test_fd_half_is_unbiased_over_subsets():
    seed = int(torch.randint(0, 2**31, ()).item())
    model, x, y, gen = perturbed_model_and_batch(SMALL, 2, seed)
    probes = rademacher(1, model.decodeL.weight, gen)
    q_all, g_all = _fd(model, x, y, probes)
    halves = [_fd(model, x, y, probes, idx=torch.tensor([i])) for i in range(2)]
    q_mean = sum(q for q, _ in halves) / 2
    g_mean = sum(g for _, g in halves) / 2
    # Exact expectation over the two equally likely subsets; differences are the FD step's (rms of z).
    assert abs(float(q_mean - q_all)) <= 2e-2 * max(abs(float(q_all)), 1e-2), seed
    assert _rel(g_mean, g_all) <= 5e-2, seed
    # Each half agrees with autograd on that half alone (the same quantity, the same probe).
    for i, (q_i, g_i) in enumerate(halves):
        q_ref, g_ref = _autograd(model, x[i : i + 1], y[i : i + 1], probes)
        assert abs(float(q_i - q_ref)) <= 1e-2 * max(abs(float(q_ref)), 1e-2), seed
        assert _rel(g_i, g_ref) <= 3e-2, seed


def test_fd_half_hutchinson_mean_equals_exact_trace():
    seed = int(torch.randint(0, 2**31, ()).item())
    model, x, y, gen = perturbed_model_and_batch(TINY, 4, seed)
    loss = loss_function()(model(x), y)
    exact = float(exact_trace(loss, model.decodeL.weight))
    reg = FamRegularizer(FamConfig(lam=1.0, estimator="fd-half", trace="signed"), model)
    values = []
    for _ in range(300):
        loss = loss_function()(model(x), y)
        values.append(float(reg(model, x, y, loss_function(), loss, gen).trace))
    v = torch.tensor(values, dtype=torch.float64)
    se = float(v.std() / math.sqrt(len(v)))
    assert abs(float(v.mean()) - exact) <= 3 * se + 1e-2 * abs(exact), (seed, float(v.mean()), exact, se)


def test_regularizer_wiring_full_detached_and_taps():
    model, x, y, gen = perturbed_model_and_batch(SMALL, 2, seed=11)
    loss_fn = loss_function()
    w = model.decodeL.weight
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    for gradient in ("full", "detached"):
        reg = FamRegularizer(FamConfig(lam=1.0, estimator="fd", gradient=gradient, trace="abs"), model)
        ff.attach_taps(model)
        loss = loss_fn(model(x), y)
        calls.clear()
        term = reg(model, x, y, loss_fn, loss, torch.Generator().manual_seed(5))
        assert len(calls) == 1  # only the stacked perturbed pass: the forward pass was reused, not re-run
        assert torch.allclose(term.penalty.detach(), (w * w).sum().detach() * term.trace.abs())
        grads = torch.autograd.grad(term.penalty, list(model.parameters()), allow_unused=True)
        named = dict(zip([n for n, _ in model.named_parameters()], grads))
        if gradient == "detached":
            # Tr(H) is a constant: the penalty acts on w alone, through ||w||^2.
            assert torch.allclose(named["decodeL.weight"], 2 * w.detach() * term.trace.abs())
            assert all(g is None or float(g.abs().max()) == 0 for n, g in named.items() if n != "decodeL.weight")
        else:
            first_conv = next(n for n in named if n.startswith("encoder."))
            assert float(named[first_conv].abs().max()) > 0  # reaches the encoder through l


def test_first_call_without_taps_recomputes_the_same_value():
    model, x, y, _ = perturbed_model_and_batch(SMALL, 2, seed=12)
    loss_fn = loss_function()
    reg = FamRegularizer(FamConfig(lam=1.0, estimator="fd", trace="signed"), model)
    ff.detach_taps(model)  # as if the forward pass ran before the regulariser existed
    loss = loss_fn(model(x), y)  # not recorded
    first = reg(model, x, y, loss_fn, loss, torch.Generator().manual_seed(1)).trace
    loss = loss_fn(model(x), y)  # now recorded
    second = reg(model, x, y, loss_fn, loss, torch.Generator().manual_seed(1)).trace
    assert torch.allclose(first, second, rtol=1e-12)


def test_fast_estimators_fall_back_to_autograd_where_they_do_not_apply():
    """Other layers than exactly decodeL: the regulariser is plain autograd's (with a warning)."""
    model, x, y, _ = perturbed_model_and_batch(SMALL, 2, seed=0)
    loss_fn = loss_function()
    values = []
    ff._WARNED.clear()
    for est in ("autograd", "fd-quarter"):
        reg = FamRegularizer(FamConfig(lam=1.0, estimator=est, layers=["decodeL", "mu"]), model)
        loss = loss_fn(model(x), y)
        with pytest.warns(UserWarning, match="decodeL") if est != "autograd" else contextlib.nullcontext():
            values.append(reg(model, x, y, loss_fn, loss, torch.Generator().manual_seed(3)).penalty.detach())
    torch.testing.assert_close(values[0], values[1])


def test_bf16_autocast_autograd_close_fd_in_float32():
    """CPU bf16 autocast: the autograd double backward stays close to float32; fd (difference passes in
    float32, tests/training/test_speed.py) no longer falls back to autograd and stays as close to it."""
    model, x, y, _ = perturbed_model_and_batch(SMALL, 2, seed=3)
    model, x, y = model.float(), x.float(), y.float()
    loss_fn = loss_function()

    def grad(estimator: str, amp: bool):
        reg = FamRegularizer(FamConfig(lam=1.0, estimator=estimator, trace="signed"), model)
        ff.attach_taps(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x).float(), y)
            term = reg(model, x, y, loss_fn, loss, torch.Generator().manual_seed(1))
        return _flat(torch.autograd.grad(term.penalty, list(model.parameters())))

    g32, g16 = grad("autograd", False), grad("autograd", True)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert _rel(g16, g32) < 0.1
    ff._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to autograd would warn
        g_fd16 = grad("fd", True)
    assert not torch.equal(g_fd16, g16)  # not autograd's value: the estimator itself ran
    assert torch.nn.functional.cosine_similarity(g_fd16, g32, dim=0) > 0.99
    assert _rel(g_fd16, g16) < 0.1
