"""Relative flatness: every estimator checked against an independent dense-Hessian computation.

Verification tests use float64, tiny networks and random inputs seeded by conftest.seed_of_this_test
(reproducible in CI; ``SKULLREC_TEST_SEED=random`` explores fresh seeds; failure messages print the seed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

import skullrec.flatness.hessian as fl
import skullrec.flatness.regularizer as fr
from skullrec.cli import flatness_command
from skullrec.config import Config, FamConfig, ModelConfig
from skullrec.errors import ConfigError, InputError
from skullrec.flatness.hessian import (
    FamTerm,
    exact_trace,
    fam_term,
    hutchinson_trace,
    kappa_neuronwise,
    kappa_simplified,
    layer_hessian,
    neuronwise_quad_forms,
    rademacher,
)
from skullrec.flatness.regularizer import FamRegularizer
from skullrec.nets.autoencoder import build_model, loss_function
from conftest import seed_of_this_test

torch.set_num_threads(1)
DT = torch.float64
SMALL = ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)


def fresh() -> tuple[torch.Generator, int]:
    """A generator with this test's seed (reported in assertion messages)."""
    seed = seed_of_this_test()
    return torch.Generator().manual_seed(seed), seed


class TinyProblem:
    """x -> tanh(x W1^T + b1) -> W2 -> squared error; the layer of interest is W1 (5 x 4)."""

    def __init__(self, g: torch.Generator, scale: float = 1.0) -> None:
        self.x = torch.randn(12, 4, generator=g, dtype=DT)
        self.y = torch.randn(12, 3, generator=g, dtype=DT)
        self.params = {
            "W1": (torch.randn(5, 4, generator=g, dtype=DT) * scale).requires_grad_(),
            "b1": torch.randn(5, generator=g, dtype=DT).requires_grad_(),
            "W2": torch.randn(3, 5, generator=g, dtype=DT).requires_grad_(),
        }

    def loss(self, W1=None, b1=None, W2=None, sign: float = 1.0) -> torch.Tensor:
        p = self.params
        W1 = p["W1"] if W1 is None else W1
        b1 = p["b1"] if b1 is None else b1
        W2 = p["W2"] if W2 is None else W2
        return sign * ((torch.tanh(self.x @ W1.T + b1) @ W2.T - self.y) ** 2).mean()

    def dense_hessian(self, sign: float = 1.0) -> torch.Tensor:
        """Independent path: torch.autograd.functional.hessian w.r.t. W1, (20, 20)."""
        w = self.params["W1"].detach()
        return hessian(lambda w1: self.loss(W1=w1, sign=sign), w).reshape(w.numel(), w.numel()).detach()


def test_hutchinson_matches_dense_trace_within_three_standard_errors():
    g, seed = fresh()
    prob = TinyProblem(g)
    H = prob.dense_hessian()
    w = prob.params["W1"]
    k = 4000
    mean, per_probe = hutchinson_trace(prob.loss(), w, samples=k, generator=g, create_graph=False)
    se = float(per_probe.detach().std() / math.sqrt(k))
    exact = float(torch.trace(H))
    assert abs(float(mean) - exact) < 3 * se, f"seed {seed}: {float(mean)} vs {exact} (SE {se})"
    # Each probe's value is exactly v^T H v of the dense Hessian (same probes, no randomness involved).
    probes = rademacher(7, w, g)
    _, vals = hutchinson_trace(prob.loss(), w, probes=probes)
    flat = probes.reshape(7, -1)
    torch.testing.assert_close(vals, torch.einsum("ki,ij,kj->k", flat, H, flat), rtol=1e-10, atol=1e-12)
    # Rademacher variance: Var(v^T H v) = 2 * sum_{i != j} H_ij^2; the sample variance agrees loosely.
    var = 2 * float((H**2).sum() - (torch.diagonal(H) ** 2).sum())
    assert 0.8 * var < float(per_probe.var()) < 1.25 * var, f"seed {seed}"


def test_batched_probes_equal_looped_probes(monkeypatch):
    g, seed = fresh()
    prob = TinyProblem(g)
    probes = rademacher(6, prob.params["W1"], g)
    monkeypatch.setattr(fl, "BATCHED_PROBES", True)
    _, batched = hutchinson_trace(prob.loss(), prob.params["W1"], probes=probes)
    monkeypatch.setattr(fl, "BATCHED_PROBES", False)
    _, looped = hutchinson_trace(prob.loss(), prob.params["W1"], probes=probes)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_exact_trace_and_layer_hessian_match_torch_func():
    g, seed = fresh()
    prob = TinyProblem(g)
    H = prob.dense_hessian()
    torch.testing.assert_close(layer_hessian(prob.loss(), prob.params["W1"]), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact_trace(prob.loss(), prob.params["W1"]), torch.trace(H), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["squared", "frobenius"])
@pytest.mark.parametrize("trace", ["signed", "abs", "relu"])
def test_kappa_hat_equals_formula_on_dense_hessian(norm, trace):
    g, seed = fresh()
    prob = TinyProblem(g)
    w = prob.params["W1"]
    n2 = float((w.detach() ** 2).sum())
    probes = rademacher(5, w, g)
    flat = probes.reshape(5, -1)
    for sign in (1.0, -1.0):  # both signs of the curvature, so abs and relu see a negative trace too
        H = prob.dense_hessian(sign)
        t = float(torch.einsum("ki,ij,kj->k", flat, H, flat).mean())
        shaped = {"signed": t, "abs": abs(t), "relu": max(t, 0.0)}[trace]
        expected = (n2 if norm == "squared" else math.sqrt(n2)) * shaped
        got = kappa_simplified(prob.loss(sign=sign), w, probes=[probes], norm=norm, trace=trace)
        assert float(got.detach()) == pytest.approx(expected, rel=1e-10, abs=1e-12), f"seed {seed}, sign {sign}"
    # Many probes: kappa_hat approaches ||w||^2 Tr(H) of the dense Hessian (3 standard errors).
    H = prob.dense_hessian()
    term = fam_term(prob.loss(), w, samples=4000, generator=g)
    _, per_probe = hutchinson_trace(prob.loss(), w, samples=2, generator=g)
    exact = n2 * float(torch.trace(H))
    se = n2 * math.sqrt(2 * float((H**2).sum() - (torch.diagonal(H) ** 2).sum()) / 4000)
    assert abs(float(term.penalty.detach()) - exact) < 3 * se, f"seed {seed}"
    assert float(term.norm_sq) == pytest.approx(n2, rel=1e-12)


def test_neuronwise_kappa_equals_formula_on_dense_hessian():
    g, seed = fresh()
    prob = TinyProblem(g)
    w = prob.params["W1"].detach().numpy()
    d, m = w.shape
    H = prob.dense_hessian().numpy().reshape(d, m, d, m)
    # The definition term by term: sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}), H_{s,s'} the m x m block.
    expected = sum(float(w[s] @ w[t]) * float(np.trace(H[s, :, t, :])) for s in range(d) for t in range(d))
    got = float(kappa_neuronwise(prob.loss(), prob.params["W1"]))
    assert got == pytest.approx(expected, rel=1e-10), f"seed {seed}"
    # The Hutchinson form E[<w w^T V, H V>] estimates the same number.
    k = 4000
    probes = rademacher(k, prob.params["W1"], g)
    (grad,) = torch.autograd.grad(prob.loss(), prob.params["W1"], create_graph=True)
    hv = fl.hessian_vector_products(grad, prob.params["W1"], probes, create_graph=False)
    vals = neuronwise_quad_forms(prob.params["W1"], probes, hv)
    se = float(vals.detach().std() / math.sqrt(k))
    assert abs(float(vals.detach().mean()) - expected) < 3 * se, f"seed {seed}: {float(vals.detach().mean())} vs {expected} (SE {se})"


def test_neuronwise_kappa_refuses_large_layers():
    w = torch.zeros(100, 50, dtype=DT, requires_grad=True)
    loss = (w**3).sum()
    with pytest.raises(InputError, match="5000 weights, above the exact limit of 4096"):
        kappa_neuronwise(loss, w)
    with pytest.raises(InputError, match="above the exact limit"):
        exact_trace(loss, w)


@pytest.mark.parametrize("norm,trace", [("squared", "signed"), ("frobenius", "abs"), ("squared", "relu")])
def test_full_gradient_of_kappa_hat_passes_gradcheck(norm, trace):
    g, seed = fresh()
    prob = TinyProblem(g)
    probes = rademacher(3, prob.params["W1"], g)

    def penalty(W1, b1, W2):
        return kappa_simplified(prob.loss(W1, b1, W2), W1, probes=[probes], gradient="full", norm=norm, trace=trace)

    inputs = tuple(p.detach().clone().requires_grad_() for p in prob.params.values())
    if trace == "relu" and float(penalty(*inputs).detach()) == 0.0:  # relu of a negative estimate: flip the curvature
        prob.y = -prob.y
    assert torch.autograd.gradcheck(penalty, inputs), f"seed {seed}"


def test_detached_gradient_is_trace_times_norm_gradient():
    g, seed = fresh()
    prob = TinyProblem(g)
    w = prob.params["W1"]
    probes = rademacher(3, w, g)
    for norm in ("squared", "frobenius"):
        loss = prob.loss()
        term = fam_term(loss, w, probes=[probes], gradient="detached", norm=norm, trace="signed")
        grads = torch.autograd.grad(term.penalty, list(prob.params.values()), allow_unused=True)
        t = term.trace
        wd = w.detach()
        expected = t * 2 * wd if norm == "squared" else t * wd / wd.norm()
        torch.testing.assert_close(grads[0], expected, rtol=1e-13, atol=0, msg=f"seed {seed}")
        assert grads[1] is None and grads[2] is None  # the detached penalty acts on w only
    # The full gradient differs: it carries the third-derivative term (and reaches b1, W2).
    full = fam_term(prob.loss(), w, probes=[probes], gradient="full")
    gf = torch.autograd.grad(full.penalty, list(prob.params.values()))
    assert not torch.allclose(gf[0], full.trace * 2 * w.detach(), rtol=1e-3)
    assert gf[2].abs().sum() > 0


def _relu_mlp(g: torch.Generator):
    x = torch.randn(16, 3, generator=g, dtype=DT)
    y = torch.randn(16, 2, generator=g, dtype=DT)
    Ws = [torch.randn(6, 3, generator=g, dtype=DT), torch.randn(5, 6, generator=g, dtype=DT), torch.randn(2, 5, generator=g, dtype=DT)]
    bs = [torch.randn(6, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT)]
    return x, y, Ws, bs


def _mlp_out(x, Ws, bs):
    h = torch.relu(x @ Ws[0].T + bs[0])
    h = torch.relu(h @ Ws[1].T + bs[1])
    return h @ Ws[2].T + bs[2]


def _flatness_of_layer1(x, y, Ws, bs):
    W = [w.clone().requires_grad_() for w in Ws]
    loss = ((_mlp_out(x, W, bs) - y) ** 2).mean()
    H = layer_hessian(loss, W[1])
    return float(torch.trace(H)), float(kappa_neuronwise(loss, W[1])), float((W[1] ** 2).sum())


def test_reparameterisation_invariance_of_neuronwise_kappa():
    """ReLU is positively homogeneous: (W1, b1, W2) -> (a W1, a b1, W2 / a) computes the same function."""
    g, seed = fresh()
    x, y, Ws, bs = _relu_mlp(g)
    tr, kappa, n2 = _flatness_of_layer1(x, y, Ws, bs)
    for a in (0.25, 3.0):
        Ws2 = [Ws[0], a * Ws[1], Ws[2] / a]
        bs2 = [bs[0], a * bs[1], bs[2]]
        torch.testing.assert_close(_mlp_out(x, Ws2, bs2), _mlp_out(x, Ws, bs), rtol=1e-12, atol=1e-12)
        tr2, kappa2, n22 = _flatness_of_layer1(x, y, Ws2, bs2)
        assert kappa2 == pytest.approx(kappa, rel=1e-10), f"seed {seed}, a {a}"
        assert tr2 == pytest.approx(tr / a**2, rel=1e-10), f"seed {seed}, a {a}"
        assert n22 * tr2 == pytest.approx(n2 * tr, rel=1e-10)  # kappa_hat is invariant to a uniform scale too
    # Neuron-wise scaling (a different a_s per neuron s of layer 1): only the neuron-wise kappa is invariant.
    a_s = torch.exp(torch.randn(5, generator=g, dtype=DT))
    Ws3 = [Ws[0], a_s[:, None] * Ws[1], Ws[2] / a_s[None, :]]
    bs3 = [bs[0], a_s * bs[1], bs[2]]
    tr3, kappa3, n23 = _flatness_of_layer1(x, y, Ws3, bs3)
    assert kappa3 == pytest.approx(kappa, rel=1e-10), f"seed {seed}"
    assert n23 * tr3 != pytest.approx(n2 * tr, rel=1e-3)


# --------------------------------------------------------------------------------------------
# The real architecture and its normalisation layers.


def _consistent_fd(fun, steps=(1e-7, 1e-8, 1e-9, 1e-10), rtol=1e-5) -> float:
    """Central difference at the largest step that agrees with the next smaller one.

    The network has (P)ReLU kinks: a step that moves a pre-activation across 0 makes v^T H v jump and
    the quotient wrong by jump/step. Two consecutive steps that agree rule that out.
    """
    est = [(fun(h) - fun(-h)) / (2 * h) for h in steps]
    for a, b in zip(est, est[1:]):
        if abs(a - b) <= rtol * max(abs(a), abs(b)):
            return a
    raise AssertionError(f"finite differences do not settle: {est}")


def test_fam_gradient_of_real_architecture_matches_finite_differences():
    """SkullAutoEncoder (GroupNorm, PReLU, transposed convs, Dice loss) at 32^3 in float64, decodeL 64x8."""
    g, seed = fresh()
    model = build_model(SMALL, seed=seed).double()
    x = (torch.rand(2, 1, 32, 32, 32, generator=g, dtype=DT) > 0.6).to(DT)
    y = torch.clamp(x + (torch.rand(2, 1, 32, 32, 32, generator=g, dtype=DT) > 0.8).to(DT), 0, 1)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    probe = rademacher(1, base["decodeL.weight"], g)
    direction = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in base.items()}
    loss_fn = loss_function()

    def penalty(params):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        return fam_term(loss, params["decodeL.weight"], probes=[probe], gradient="full", trace="signed").penalty

    params = {k: v.clone().requires_grad_() for k, v in base.items()}
    grads = torch.autograd.grad(penalty(params), list(params.values()))
    auto = sum(float((gr * direction[k]).sum()) for gr, k in zip(grads, params))
    fd = _consistent_fd(lambda h: float(penalty({k: (v + h * direction[k]).requires_grad_() for k, v in base.items()})))
    assert auto == pytest.approx(fd, rel=1e-5), f"seed {seed}: autograd {auto} vs finite differences {fd}"


def _decoder_penalty(norm_layer: nn.Module, g: torch.Generator):
    """A miniature decoder: latent -> W (16x3) -> transposed conv -> norm -> Dice; penalty of W."""
    W = torch.randn(16, 3, generator=g, dtype=DT)
    tw = torch.randn(2, 3, 3, 3, 3, generator=g, dtype=DT) * 0.3
    lat = torch.randn(2, 3, generator=g, dtype=DT)
    y = (torch.rand(2, 3, 4, 4, 4, generator=g, dtype=DT) > 0.5).to(DT)
    probe = rademacher(1, W, g)

    def penalty(W, tw):
        z = (lat @ W.T).reshape(2, 2, 2, 2, 2)
        h = norm_layer(F.conv_transpose3d(z, tw, stride=2, padding=1, output_padding=1))
        loss = loss_function("sigmoid_dice")(torch.tanh(h), y)
        return fam_term(loss, W, probes=[probe], gradient="full").penalty

    return penalty, (W.requires_grad_(), tw.requires_grad_())


def test_groupnorm_third_order_gradient_passes_gradcheck():
    g, seed = fresh()
    penalty, inputs = _decoder_penalty(nn.GroupNorm(3, 3, affine=False), g)
    assert torch.autograd.gradcheck(penalty, inputs), f"seed {seed}"


@pytest.mark.skipif(not torch.__version__.startswith("2.13"), reason="the InstanceNorm bug was observed on torch 2.13")
def test_instancenorm_third_order_gradient_is_wrong_in_this_torch():
    """Why the model uses GroupNorm(C, C): the same forward, but InstanceNorm's third-order backward is wrong.

    If this starts failing, torch has fixed it and FamRegularizer's InstanceNorm guard could be relaxed.
    """
    g, seed = fresh()
    state = g.get_state()
    penalty, inputs = _decoder_penalty(nn.InstanceNorm3d(3), g)
    g.set_state(state)
    penalty_g, _ = _decoder_penalty(nn.GroupNorm(3, 3, affine=False), g)
    assert float(penalty(*inputs).detach()) == pytest.approx(float(penalty_g(*inputs).detach()), rel=1e-12)  # same forward value
    assert not torch.autograd.gradcheck(penalty, inputs, raise_exception=False), f"seed {seed}"


# --------------------------------------------------------------------------------------------
# FamRegularizer


def test_fam_regularizer_resolves_layers_and_matches_kappa_simplified():
    model = build_model(SMALL, seed=0)
    cfg = FamConfig(lam=0.1, layers=["decodeL", "mu"], samples=3, gradient="full", trace="abs", estimator="autograd")
    reg = FamRegularizer(cfg, model)
    x = (torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    loss_fn = loss_function()
    loss = loss_fn(model(x), x)
    term = reg.reg(model, x, x, loss_fn, loss, torch.Generator().manual_seed(5))
    assert isinstance(term, FamTerm) and term.penalty.requires_grad and not term.trace.requires_grad
    assert set(term.per_layer) == {"decodeL", "mu"}
    gen = torch.Generator().manual_seed(5)
    expected = kappa_simplified(loss, [model.decodeL.weight, model.mu.weight], samples=3, trace="abs", generator=gen)
    torch.testing.assert_close(term.penalty, expected)
    n2 = float((model.decodeL.weight**2).sum() + (model.mu.weight**2).sum())
    assert float(term.norm_sq) == pytest.approx(n2, rel=1e-6)
    (loss + cfg.lam * term.penalty).backward()  # the trainer's use: everything still differentiable
    assert model.encoder[0].conv.weight.grad is not None


def test_fam_regularizer_errors_and_estimator_registry():
    model = build_model(SMALL, seed=0)
    with pytest.raises(ConfigError, match=r"no Linear layer 'decoder'.*available: mu, decodeL"):
        FamRegularizer(FamConfig(layers=["decoder"]), model)
    with pytest.raises(ConfigError, match="fam.estimator: unknown estimator 'nope'"):
        FamRegularizer(FamConfig(estimator="nope"), model)
    inst = build_model(ModelConfig(**{**SMALL.__dict__, "norm": "instance"}), seed=0)
    with pytest.raises(ConfigError, match="InstanceNorm"):
        FamRegularizer(FamConfig(lam=0.1, gradient="full"), inst)
    FamRegularizer(FamConfig(lam=0.1, gradient="detached"), inst)  # no third derivatives: allowed
    FamRegularizer(FamConfig(lam=0.0, gradient="full"), inst)  # monitoring only (baseline): allowed

    calls = []

    def fake(reg, model, x, y, loss_fn, loss, generator):
        calls.append(reg.layers)
        zero = loss.new_zeros(())
        return FamTerm(penalty=zero, trace=zero, norm_sq=zero)

    fr.ESTIMATORS["test-fake"] = fr.Estimator(fake)  # the table is a plain dict: an entry is all a new estimator needs
    try:
        reg = FamRegularizer(FamConfig(estimator="test-fake"), model)
        reg(model, None, None, None, torch.zeros(()), None)
        assert calls == [["decodeL"]]
    finally:
        fr.ESTIMATORS.pop("test-fake")


def test_flatness_command_prints_estimates_and_exact_values(tmp_path, capsys):
    ckpt_mod = pytest.importorskip("skullrec.nets.checkpoint")
    from skullrec.data.layout import load_split, write_case, write_manifest

    g = np.random.default_rng(seed_of_this_test())
    root = tmp_path / "data"
    for i in range(3):
        complete = g.random((16, 16, 16)) > 0.7
        defective = complete & (g.random((16, 16, 16)) > 0.2)
        write_case(root, "train", f"{i:03d}", complete, defective, np.eye(4))
    write_manifest(root, [])
    # 16^3, three stride-2 stages, latent 2: decodeL is 64 x 2 (128 weights) to keep the exact part quick.
    cfg = Config(model=ModelConfig(size=16, channels=[4, 8, 8], strides=[2, 2, 2], latent_size=2))
    model = build_model(cfg.model, seed=0)
    path = ckpt_mod.save_checkpoint(tmp_path / "m.safetensors", model, cfg)
    results = flatness_command(checkpoint=path, data=root, split="train", samples=16, max_cases=None, device="cpu")
    out = capsys.readouterr().out
    assert "3 cases" in out and "Tr(H)" in out and "kappa_hat" in out and "kappa (neuron)" in out
    (r,) = results
    assert r.trace_exact is not None and r.kappa_nw_exact is not None  # 128 weights at 16^3: cheap enough
    # Independent: the dense Hessian of the mean Dice loss over all three cases at once.
    split = load_split(root, "train")
    x = torch.from_numpy(split.defective[:, None]).float()
    y = torch.from_numpy(split.complete[:, None]).float()
    loss = loss_function()(model(x), y)
    assert r.trace_exact == pytest.approx(float(exact_trace(loss, model.decodeL.weight)), rel=1e-3, abs=1e-6)
    assert r.kappa_nw_exact == pytest.approx(float(kappa_neuronwise(loss, model.decodeL.weight)), rel=1e-3, abs=1e-6)
    assert abs(r.trace_mean - r.trace_exact) < 4 * r.trace_se + 1e-6
    assert r.norm_sq == pytest.approx(float((model.decodeL.weight**2).sum()), rel=1e-6)
    with pytest.raises(InputError, match="--samples"):
        flatness_command(checkpoint=path, data=root, split="train", samples=1, max_cases=None, device="cpu")
