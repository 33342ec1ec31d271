"""Bias of every (fam.estimator, fam.trace) pair against the whole-batch exact value, on fresh random inputs.

The target of the penalty is N(w) * T(Tr H) with Tr H the exact trace of the *whole batch's* loss
(dense Hessian here, float64). Per pair, one of:

* unbiased: ``signed`` with every estimator. Whole-batch estimators: E[v^T H v] = Tr H (Hutchinson;
  fd up to its O(eps^2) step bias, bounded in tests/test_fast_flatness.py). Subset estimators: the mean
  over all equally likely subsets of the value *and the gradient* equals the whole batch's (checked
  exactly, same probe), and the Monte-Carlo mean over draws equals the exact trace within 3 SE.
* bounded: ``abs`` / ``relu`` with a whole-batch estimator (autograd, outspace, fd). Both shapes are
  1-Lipschitz, so |E T(q) - T(Tr H)| <= E|q - Tr H| <= SD(q) = sqrt(2 sum_{i != j} H_ij^2 / k)
  (Rademacher probes, k of them), and for abs E|q| >= |Tr H| (Jensen): the bias lies in [0, SD]. The
  test measures it by drawing the estimator many times and checks it against that bound.
* refused: ``abs`` / ``relu`` with a subset estimator (fd-half, fd-quarter), or under DDP with
  several ranks (each shard shaped separately): ConfigError naming fam.trace.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from skullrec.flatness import fast as ff
from skullrec.config import FamConfig, ModelConfig
from skullrec.errors import ConfigError
from skullrec.flatness.hessian import layer_hessian, rademacher
from skullrec.flatness.regularizer import FamRegularizer, check_unbiased
from skullrec.nets.autoencoder import build_model, loss_function
from conftest import perturbed_model_and_batch, seed_of_this_test

torch.set_num_threads(1)
# decodeL 32 x 2 (64 weights): the dense Hessian is cheap; the real layer types and loss.
TINY = ModelConfig(size=16, channels=[4, 4, 4], strides=[2, 2, 2], latent_size=2)
SMALL = ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)


def _fresh_seed() -> int:
    return seed_of_this_test()


def _setup(cfg: ModelConfig, batch: int, seed: int, loss: str = "sigmoid_dice"):
    return perturbed_model_and_batch(dataclasses.replace(cfg, loss=loss), batch, seed)


def _exact(model, x, y, loss_fn) -> tuple[float, float]:
    """(Tr H, SD of one Rademacher probe's v^T H v) of the whole batch's loss, from the dense Hessian."""
    h = layer_hessian(loss_fn(model(x), y), model.decodeL.weight)
    h = h.reshape(model.decodeL.weight.numel(), -1)
    off = h - torch.diag(torch.diag(h))
    return float(torch.trace(h)), math.sqrt(2 * float((off**2).sum()))


@pytest.mark.parametrize("estimator", ["autograd", "outspace", "fd"])
@pytest.mark.parametrize("trace", ["abs", "relu"])
def test_whole_batch_abs_relu_bias_is_within_the_probe_spread(estimator, trace):
    seed = _fresh_seed()
    model, x, y, gen = _setup(TINY, 4, seed)
    loss_fn = loss_function("sigmoid_dice")  # the model of _setup(...) without a loss argument
    t, sd = _exact(model, x, y, loss_fn)
    reg = FamRegularizer(FamConfig(lam=1.0, estimator=estimator, trace=trace, norm="squared"), model)
    n2 = float(model.decodeL.weight.detach().pow(2).sum())
    draws = []
    for _ in range(200):
        loss = loss_fn(model(x), y)
        draws.append(float(reg(model, x, y, loss_fn, loss, gen).penalty.detach()) / n2)
    v = torch.tensor(draws, dtype=torch.float64)
    mcse = float(v.std() / math.sqrt(len(v)))
    bias = float(v.mean()) - {"abs": abs(t), "relu": max(t, 0.0)}[trace]
    slack = 3 * mcse + 2e-2 * abs(t) + 1e-9  # Monte-Carlo error, and fd's O(eps^2) step bias
    assert abs(bias) <= sd + slack, (seed, bias, sd, t)
    if trace == "abs":
        assert bias >= -slack, (seed, bias)  # Jensen: E|q| >= |Tr H|
    print(f"seed {seed} {estimator}/{trace}: Tr H {t:.4g}, bias {bias:.3g} = {bias / max(abs(t), 1e-12):.3g} Tr, bound SD {sd:.3g}")


@pytest.mark.parametrize("loss", ["sigmoid_dice", "softmax_dice"])
def test_subset_estimators_signed_are_unbiased_exactly_over_subsets(loss):
    """fd-quarter at batch 4 draws one sample uniformly: the mean over the 4 samples is the batch's fd value and gradient."""
    seed = _fresh_seed()
    model, x, y, gen = _setup(SMALL, 4, seed, loss)
    loss_fn = loss_function(loss)
    probes = rademacher(1, model.decodeL.weight, gen)
    params = list(model.parameters())

    def fd(idx):
        taps = ff.attach_taps(model)
        logits = model(x)
        q = ff.fd_quadratic_form(model, taps, taps.latent, taps.z, logits, y, loss_fn, probes, idx)
        taps.clear()
        return q.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, params)])

    q_all, g_all = fd(None)
    singles = [fd(torch.tensor([n])) for n in range(4)]
    pairs = [fd(torch.tensor(p)) for p in ([0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3])]
    for subsets in (singles, pairs):  # fd-quarter's and fd-half's subsets at batch 4
        q_mean = sum(q for q, _ in subsets) / len(subsets)
        g_mean = sum(g for _, g in subsets) / len(subsets)
        # Identical expectation; the per-sample FD step makes each sample's term independent of the subset.
        assert abs(float(q_mean - q_all)) <= 1e-9 * max(abs(float(q_all)), 1e-6), seed
        assert float((g_mean - g_all).norm() / g_all.norm()) <= 1e-8, seed


@pytest.mark.parametrize("estimator", ["fd-quarter", "fd-half"])
def test_subset_estimator_signed_mean_equals_the_whole_batch_exact_trace(estimator):
    seed = _fresh_seed()
    model, x, y, gen = _setup(TINY, 4, seed, "softmax_dice")
    loss_fn = loss_function("softmax_dice")
    t, _ = _exact(model, x, y, loss_fn)
    reg = FamRegularizer(FamConfig(lam=1.0, estimator=estimator, trace="signed"), model)
    vals = []
    for _ in range(200):
        loss = loss_fn(model(x), y)
        vals.append(float(reg(model, x, y, loss_fn, loss, gen).trace))
    v = torch.tensor(vals, dtype=torch.float64)
    se = float(v.std() / math.sqrt(len(v)))
    assert abs(float(v.mean()) - t) <= 3 * se + 1e-2 * abs(t), (seed, float(v.mean()), t, se)


@pytest.mark.parametrize("estimator", ["fd-quarter", "fd-half"])
@pytest.mark.parametrize("trace", ["abs", "relu"])
def test_subset_estimators_refuse_abs_and_relu(estimator, trace):
    model = build_model(SMALL, seed=0)
    with pytest.raises(ConfigError, match=f"fam.trace: '{trace}' of a random-subset estimate"):
        FamRegularizer(FamConfig(lam=0.01, estimator=estimator, trace=trace), model)
    # Monitoring (lam = 0) reads only the signed trace: allowed.
    FamRegularizer(FamConfig(lam=0.0, estimator=estimator, trace=trace), model)


def test_ddp_refuses_abs_and_relu_but_not_signed():
    with pytest.raises(ConfigError, match="under DDP"):
        check_unbiased(FamConfig(lam=0.01, estimator="fd", trace="abs"), world_size=2)
    check_unbiased(FamConfig(lam=0.01, estimator="fd-quarter", trace="signed"), world_size=2)
    check_unbiased(FamConfig(lam=0.01, estimator="fd", trace="abs"), world_size=1)


def test_one_sample_abs_bias_is_what_the_refusal_prevents():
    """Why the refusal: with mixed-sign per-sample traces, |.| of one sample's value is far from |batch Tr H|."""
    seed = 5
    model, x, y, _ = _setup(SMALL, 4, seed)
    loss_fn = loss_function("sigmoid_dice")  # the model of _setup(...) without a loss argument
    per = ff.exact_trace_per_sample(model, x, y, loss_fn)
    whole = float(per.mean())
    # E over the uniformly drawn sample of |Tr H_n| (probe noise aside) vs |Tr H of the batch|.
    subset_abs = float(per.abs().mean())
    assert subset_abs >= abs(whole) - 1e-12
    if bool((per > 0).any()) and bool((per < 0).any()):
        assert subset_abs > abs(whole) * (1 + 1e-6)
