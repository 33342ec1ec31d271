"""Relative flatness of a layer (Petzka et al. 2021; FAM, Adilova et al. 2023) and the FAM regulariser.

For a layer with weights w in R^{d x m} (rows w_s; torch's Linear layout ``(out, in)``) and H the
Hessian of the training loss with respect to w:

* simplified:  kappa_hat(w) = ||w||_F^2 * Tr(H), Tr(H) estimated by Hutchinson: E[v^T H v], v Rademacher;
* neuron-wise: kappa(w) = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) with H_{s,s'} the m x m block of rows
  s, s'. It equals Tr((w w^T (x) I_m) H), so Hutchinson estimates it too: E[<w w^T V, H V>] with the
  same Hessian-vector products H V (V a Rademacher probe shaped like w).

All functions take a scalar ``loss`` that still has its graph and the weight tensor(s) it depends on,
and are differentiable (``create_graph=True``): the gradient of the regulariser then includes the
third-derivative term of the paper's Lemma 1. Options of :func:`fam_term` / :func:`kappa_simplified`
(see docs/flatness.md for what each changes and why the default was chosen):

* ``gradient="full"`` differentiates ||w||^2 * Tr(H) as written; ``"detached"`` treats Tr(H) as a
  constant (like the authors' public code), so the penalty acts on w only, via its norm, and costs no
  third-order backward;
* ``norm="squared"`` uses ||w||^2 (paper); ``"frobenius"`` uses ||w|| (public code);
* ``trace="signed" | "abs" | "relu"``: Tr(H) as is, |Tr(H)|, or max(Tr(H), 0). With Dice loss Tr(H)
  is negative at initialisation, so minimising ||w||^2 Tr(H) as written is unbounded below.

Hessian-vector products use reverse-over-reverse autograd, one backward per probe (the first
gradient is shared by all probes); :data:`BATCHED_PROBES` can push all probes through one batched
backward instead (measured in benchmarks/flatness_batching.py, numbers in docs/flatness.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import ConfigError, FamConfig
from .io import InputError

# Dense layer Hessians need one Hessian-vector product per weight and numel^2 memory: refuse above this.
MAX_EXACT_WEIGHTS = 4096
# How several probes are pushed through the double backward:
#   False   a Python loop, one backward per probe (the default, see below);
#   True    one batched backward (``is_grads_batched``, i.e. vmap over the backward);
#   "auto"  batched, falling back to the loop (for the rest of the process) when torch has no batching
#           rule for some op in the graph.
# Measured (benchmarks/flatness_batching.py, torch 2.13 CPU, numbers in docs/flatness.md): batching fails
# on SkullAutoEncoder (GroupNorm's double backward has no vmap rule), and where it runs (an MLP) it is
# slower than the loop once the trace's own gradient is needed; it only wins for many probes without
# a graph. Hence the loop by default.
BATCHED_PROBES: bool | str = False
_batched_unsupported = False

GRADIENTS = ("full", "detached")
NORMS = ("squared", "frobenius")
TRACES = ("signed", "abs", "relu")


@dataclass
class FamTerm:
    """One evaluation of the regulariser.

    Attributes:
        penalty: scalar with graph; the trainer adds ``lam * penalty`` to the loss.
        trace: Tr(H) estimate (signed, summed over the regularised layers), detached.
        norm_sq: ||w||_F^2 summed over the regularised layers, detached.
        per_layer: name -> (trace, norm_sq) as detached 0-d tensors, for logging several layers
            (tensors, not floats: reading a float would make a GPU step wait for the device).
    """

    penalty: Tensor
    trace: Tensor
    norm_sq: Tensor
    per_layer: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def rademacher(n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``n`` Rademacher (+-1) tensors shaped like ``like``, stacked: (n, *like.shape).

    Drawn on the generator's device (CPU when None, from torch's global RNG), then moved to
    ``like``'s device: a seeded CPU generator gives the same probes for CPU and GPU weights.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    bits = torch.randint(0, 2, (n, *like.shape), generator=generator, device=device, dtype=torch.int8)
    return (bits.to(device=like.device, dtype=like.dtype) * 2 - 1).contiguous()


def hessian_vector_products(grad: Tensor, weight: Tensor, probes: Tensor, create_graph: bool = True) -> Tensor:
    """H v for each probe v in ``probes`` (k, *weight.shape), given ``grad`` = dL/dweight with its graph.

    Returns (k, *weight.shape). The graph of ``grad`` is kept (the caller may still backprop the loss).
    """
    global _batched_unsupported
    use_batched = BATCHED_PROBES is True or (BATCHED_PROBES == "auto" and not _batched_unsupported)
    if use_batched and probes.shape[0] > 1:
        try:
            (hv,) = torch.autograd.grad(
                grad, weight, grad_outputs=probes, is_grads_batched=True, retain_graph=True, create_graph=create_graph
            )
            return hv
        except RuntimeError:
            if BATCHED_PROBES is True:
                raise
            _batched_unsupported = True
    out = [
        torch.autograd.grad(grad, weight, grad_outputs=v, retain_graph=True, create_graph=create_graph)[0]
        for v in probes
    ]
    return torch.stack(out)


def _as_list(weights: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [weights] if isinstance(weights, Tensor) else list(weights)


def _grads(loss: Tensor, weights: list[Tensor]) -> tuple[Tensor, ...]:
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    # create_graph: the Hessian-vector products differentiate this gradient again.
    return torch.autograd.grad(loss, weights, create_graph=True, retain_graph=True)


def hutchinson_trace(
    loss: Tensor,
    weight: Tensor,
    samples: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    probes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of Tr(d^2 loss / d weight^2): (mean over probes, per-probe v^T H v).

    ``probes`` (k, *weight.shape) overrides ``samples``/``generator`` (fixed probes, e.g. for gradcheck).
    With ``create_graph`` the result is differentiable w.r.t. every parameter the loss depends on.
    The standard error of the mean is ``per_probe.std() / sqrt(k)``.
    """
    if probes is None:
        probes = rademacher(samples, weight, generator)
    (g,) = _grads(loss, [weight])
    hv = hessian_vector_products(g, weight, probes, create_graph)
    per_probe = (hv * probes).flatten(1).sum(1)
    return per_probe.mean(), per_probe


def _check_option(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"fam.{key}: must be one of {', '.join(allowed)}, got {value!r}")


def shape_trace(trace: Tensor, mode: str) -> Tensor:
    """Tr(H) as the penalty uses it: as is ("signed"), |Tr(H)| ("abs") or max(Tr(H), 0) ("relu")."""
    _check_option("trace", mode, TRACES)
    if mode == "abs":
        return trace.abs()
    if mode == "relu":
        return trace.clamp_min(0)
    return trace


def fam_term(
    loss: Tensor,
    weights: Tensor | Sequence[Tensor],
    *,
    samples: int = 1,
    gradient: str = "full",
    norm: str = "squared",
    trace: str = "signed",
    generator: torch.Generator | None = None,
    probes: Sequence[Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> FamTerm:
    """Sum over layers of N(w) * T(Tr(H)), with N = ||w||^2 or ||w|| and T = shape_trace(.., trace).

    ``probes``: optional fixed probes, one (k, *w.shape) tensor per weight.
    """
    _check_option("gradient", gradient, GRADIENTS)
    _check_option("norm", norm, NORMS)
    _check_option("trace", trace, TRACES)
    weights = _as_list(weights)
    names = list(names) if names is not None else [f"w{i}" for i in range(len(weights))]
    full = gradient == "full"
    grads = _grads(loss, weights)
    penalty = loss.new_zeros(())
    traces, norms, per_layer = [], [], {}
    for i, (w, g) in enumerate(zip(weights, grads)):
        v = probes[i] if probes is not None else rademacher(samples, w, generator)
        # Detached: no graph through H v at all, so no third-order backward is ever built.
        hv = hessian_vector_products(g, w, v, create_graph=full)
        tr = (hv * v).flatten(1).sum(1).mean()
        n2 = (w * w).sum()
        t_used = shape_trace(tr, trace)
        if not full:
            t_used = t_used.detach()
        penalty = penalty + (n2 if norm == "squared" else n2.sqrt()) * t_used
        traces.append(tr.detach())
        norms.append(n2.detach())
        per_layer[names[i]] = (tr.detach(), n2.detach())
    return FamTerm(penalty=penalty, trace=torch.stack(traces).sum(), norm_sq=torch.stack(norms).sum(), per_layer=per_layer)


def kappa_simplified(
    loss: Tensor,
    weights: Tensor | Sequence[Tensor],
    *,
    samples: int = 1,
    gradient: str = "full",
    norm: str = "squared",
    trace: str = "signed",
    generator: torch.Generator | None = None,
    probes: Sequence[Tensor] | None = None,
) -> Tensor:
    """kappa_hat = sum over layers of ||w||^2 * Tr(H) (Hutchinson), with the options of :func:`fam_term`."""
    return fam_term(
        loss, weights, samples=samples, gradient=gradient, norm=norm, trace=trace, generator=generator, probes=probes
    ).penalty


def _check_exact_size(weight: Tensor, max_weights: int, what: str) -> None:
    if weight.numel() > max_weights:
        raise InputError(
            f"{what}: the layer has {weight.numel()} weights, above the exact limit of {max_weights} "
            f"(a dense Hessian needs one Hessian-vector product per weight); use the Hutchinson estimate"
        )


def layer_hessian(
    loss: Tensor, weight: Tensor, create_graph: bool = False, max_weights: int = MAX_EXACT_WEIGHTS, chunk: int = 64
) -> Tensor:
    """The dense Hessian of ``loss`` w.r.t. ``weight``, (n, n) with n = weight.numel(), row-major order."""
    _check_exact_size(weight, max_weights, "layer_hessian")
    n = weight.numel()
    (g,) = _grads(loss, [weight])
    eye = torch.eye(n, dtype=weight.dtype, device=weight.device).reshape(n, *weight.shape)
    rows = [hessian_vector_products(g, weight, eye[i : i + chunk], create_graph).reshape(-1, n) for i in range(0, n, chunk)]
    return torch.cat(rows)


def exact_trace(loss: Tensor, weight: Tensor, create_graph: bool = False, max_weights: int = MAX_EXACT_WEIGHTS) -> Tensor:
    """Tr(H) from the dense layer Hessian (small layers only)."""
    return torch.diagonal(layer_hessian(loss, weight, create_graph, max_weights)).sum()


def neuronwise_from_hessian(weight: Tensor, hessian: Tensor) -> Tensor:
    """kappa(w) = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) from a dense (d*m, d*m) Hessian of w (d x m)."""
    d, m = weight.shape
    block_traces = torch.einsum("atbt->ab", hessian.reshape(d, m, d, m))  # Tr(H_{s,s'}), (d, d)
    return ((weight @ weight.T) * block_traces).sum()


def kappa_neuronwise(
    loss: Tensor, weight: Tensor, create_graph: bool = False, max_weights: int = MAX_EXACT_WEIGHTS
) -> Tensor:
    """Exact neuron-wise relative flatness of a 2-D weight (rows = neurons) from its dense Hessian."""
    if weight.dim() != 2:
        raise ValueError(f"kappa_neuronwise needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    _check_exact_size(weight, max_weights, "kappa_neuronwise")
    return neuronwise_from_hessian(weight, layer_hessian(loss, weight, create_graph, max_weights))


def neuronwise_quad_forms(weight: Tensor, probes: Tensor, hv: Tensor) -> Tensor:
    """Per-probe Hutchinson values <w w^T V, H V> of neuron-wise kappa = Tr((w w^T (x) I) H)."""
    gram = weight.detach() @ weight.detach().T
    return (torch.matmul(gram, probes) * hv).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------
# The regulariser used by the trainer, with a registry of estimators of the penalty.

# An estimator computes the FamTerm for FamRegularizer ``reg`` on a batch. "autograd" (below) uses
# the loss's own graph; faster ones (skullrec.fast_flatness) register themselves with register_estimator.
Estimator = Callable[..., FamTerm]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, fn: Estimator) -> Estimator:
    """Make ``fn(reg, model, x, y, loss_fn, loss, generator) -> FamTerm`` available as fam.estimator=name."""
    ESTIMATORS[name] = fn
    return fn


def _autograd_estimator(
    reg: FamRegularizer, model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, loss: Tensor, generator: torch.Generator | None
) -> FamTerm:
    cfg = reg.cfg
    return fam_term(
        loss, reg.weights(model), samples=cfg.samples, gradient=cfg.gradient, norm=cfg.norm, trace=cfg.trace,
        generator=generator, names=reg.layers,
    )


register_estimator("autograd", _autograd_estimator)


class FamRegularizer:
    """lam * kappa_hat of the Linear layers named in ``cfg.layers``; ``reg(...)`` gives the FamTerm.

    Raises ConfigError for an unknown layer (listing the available ones), an unknown estimator, or
    ``lam > 0`` with ``gradient="full"`` on a model with InstanceNorm3d (wrong third-order gradient in
    torch 2.13; with lam = 0 the regulariser only monitors Tr(H), which is right).
    """

    def __init__(self, cfg: FamConfig, model: nn.Module) -> None:
        from .model import get_linear

        self.cfg = cfg
        self.layers = list(cfg.layers)
        for name in self.layers:
            get_linear(model, name)
        for key, value, allowed in (("gradient", cfg.gradient, GRADIENTS), ("norm", cfg.norm, NORMS), ("trace", cfg.trace, TRACES)):
            _check_option(key, value, allowed)
        if cfg.estimator not in ESTIMATORS:
            _load_plugins()
        if cfg.estimator not in ESTIMATORS:
            raise ConfigError(f"fam.estimator: unknown estimator {cfg.estimator!r} (available: {', '.join(ESTIMATORS)})")
        # An estimator may need to see the forward passes (skullrec.fast_flatness records them with hooks).
        prepare = getattr(ESTIMATORS[cfg.estimator], "prepare", None)
        if prepare is not None:
            prepare(model)
        check_unbiased(cfg)
        if cfg.lam > 0 and cfg.gradient == "full" and any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in model.modules()):
            raise ConfigError(
                "fam.gradient: 'full' needs third derivatives, which torch computes wrongly through InstanceNorm; "
                "use model.norm=group (same forward) or fam.gradient=detached"
            )

    def weights(self, model: nn.Module) -> list[Tensor]:
        """The regularised weight tensors, looked up by name on ``model`` (which may be a DDP wrapper)."""
        from .model import get_linear

        return [get_linear(model, name).weight for name in self.layers]

    def __call__(self, *args: Any, **kwargs: Any) -> FamTerm:
        return self.reg(*args, **kwargs)

    def reg(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        loss: Tensor,
        generator: torch.Generator | None = None,
    ) -> FamTerm:
        """The regulariser on one batch; ``loss = loss_fn(model(x), y)`` must still have its graph."""
        return ESTIMATORS[self.cfg.estimator](self, model, x, y, loss_fn, loss, generator)


# Estimators that evaluate the curvature on a random subset of the batch: their *signed* estimate is
# unbiased for the batch's v^T H v, but |.| or max(., 0) of a subset's estimate is not the shaped batch
# value (E|q_subset| >= |E q_subset|, and the per-sample traces need not share a sign).
SUBSET_ESTIMATORS = ("fd-half", "fd-quarter")


def check_unbiased(cfg: FamConfig, world_size: int = 1) -> None:
    """Refuse (ConfigError) a regularising configuration whose penalty would be a biased estimate.

    fam.trace abs / relu shape a *subset's* estimate when the estimator draws a random part of the batch,
    or when DDP ranks each shape their own shard's estimate before averaging: both are biased against
    the shaped whole-batch value (measured in docs/performance.md). Monitoring (lam = 0) only reads the
    signed trace and is always allowed. Whole-batch estimators with abs / relu keep a bias bounded by
    the probe spread (tests/test_estimator_bias.py).
    """
    if cfg.lam <= 0 or cfg.trace == "signed":
        return
    if cfg.estimator in SUBSET_ESTIMATORS:
        raise ConfigError(
            f"fam.trace: '{cfg.trace}' of a random-subset estimate (fam.estimator={cfg.estimator}) is biased; "
            "use fam.trace=signed (unbiased) or a whole-batch estimator (fam.estimator=fd, outspace or autograd)"
        )
    if world_size > 1:
        raise ConfigError(
            f"fam.trace: '{cfg.trace}' under DDP shapes each rank's shard estimate (biased); use fam.trace=signed "
            "with several processes, or train in one process"
        )


def grad_ratio(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    reg: FamRegularizer,
    generator: torch.Generator | None = None,
    *,
    lam: float = 1.0,
    loss_scale: float = 1.0,
    penalty_scale: float = 1.0,
) -> dict[str, float]:
    """||grad(lam * penalty_scale * penalty)|| / ||grad(loss_scale * loss)|| on one batch, over all parameters and per layer.

    Keys: ``all`` (every parameter of the model) and each regularised layer's name (its weight only).
    The gradients are taken with ``torch.autograd.grad``: nothing accumulates in ``.grad``, and the
    model's weights are untouched. ``lam = 1`` gives the ratio per unit lambda (ratio is linear in lam).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    term = reg(model, x, y, loss_fn, loss, generator)
    g_loss = torch.autograd.grad(loss_scale * loss, params, retain_graph=True, allow_unused=True)
    g_pen = torch.autograd.grad(lam * penalty_scale * term.penalty, params, allow_unused=True)

    def norm(gs: Sequence[Tensor | None], keep: Callable[[Tensor], bool] = lambda p: True) -> float:
        total = sum(float(g.detach().double().pow(2).sum()) for p, g in zip(params, gs) if g is not None and keep(p))
        return math.sqrt(total)

    out = {"all": norm(g_pen) / max(norm(g_loss), 1e-300)}
    for name, w in zip(reg.layers, reg.weights(model)):
        is_w = lambda p, w=w: p is w  # noqa: E731
        out[name] = norm(g_pen, is_w) / max(norm(g_loss, is_w), 1e-300)
    return out


def _load_plugins() -> None:
    """Import optional modules that register more estimators (absent ones are skipped)."""
    import importlib

    for mod in ("skullrec.fast_flatness",):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


# ----------------------------------------------------------------------------------------------
# `skullrec flatness`


@dataclass
class LayerFlatness:
    """Measured flatness of one layer on a data set (floats; ``None`` where not computed)."""

    name: str
    shape: tuple[int, ...]
    norm_sq: float
    trace_mean: float
    trace_se: float
    kappa_nw_mean: float
    kappa_nw_se: float
    samples: int
    seconds_per_probe: float
    trace_exact: float | None = None
    kappa_nw_exact: float | None = None
    exact_estimate_s: float | None = None  # predicted time of the exact (dense) part

    @property
    def kappa_hat(self) -> float:
        return self.norm_sq * self.trace_mean

    @property
    def kappa_hat_se(self) -> float:
        return self.norm_sq * self.trace_se


def _dataset_products(
    model: nn.Module, weight: Tensor, x: Tensor, y: Tensor, loss_fn: Callable, probes: Tensor, batch_size: int, probe_chunk: int
) -> Tensor:
    """H V for the mean loss over all cases (the Hessian of a mean is the mean of the batch Hessians)."""
    n = x.shape[0]
    total = torch.zeros_like(probes)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        loss = loss_fn(model(xb), yb)
        (g,) = _grads(loss, [weight])
        for p in range(0, probes.shape[0], probe_chunk):
            hv = hessian_vector_products(g, weight, probes[p : p + probe_chunk], create_graph=False)
            total[p : p + probe_chunk] += hv.detach() * (xb.shape[0] / n)
        del loss, g
    return total


def measure_layer(
    model: nn.Module,
    name: str,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable,
    samples: int,
    generator: torch.Generator,
    exact_budget_s: float = 60.0,
    batch_size: int = 2,
    probe_chunk: int = 8,
) -> LayerFlatness:
    """Hutchinson Tr(H) and neuron-wise kappa (mean, SE) of one Linear layer on (x, y); exact if cheap.

    The exact values need one Hessian-vector product per weight; they are computed when the measured
    time per probe says that takes at most ``exact_budget_s`` seconds (and the layer is small enough).
    """
    from .model import get_linear

    weight = get_linear(model, name).weight
    probes = rademacher(samples, weight, generator)
    t0 = time.perf_counter()
    hv = _dataset_products(model, weight, x, y, loss_fn, probes, batch_size, probe_chunk)
    per_probe_s = (time.perf_counter() - t0) / samples
    tr = (hv * probes).flatten(1).sum(1)
    knw = neuronwise_quad_forms(weight, probes, hv)
    se = (lambda v: float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))
    out = LayerFlatness(
        name=name, shape=tuple(weight.shape), norm_sq=float((weight.detach() ** 2).sum()),
        trace_mean=float(tr.mean()), trace_se=se(tr), kappa_nw_mean=float(knw.mean()), kappa_nw_se=se(knw),
        samples=samples, seconds_per_probe=per_probe_s,
    )
    n = weight.numel()
    out.exact_estimate_s = per_probe_s * n
    if n <= MAX_EXACT_WEIGHTS and per_probe_s * n <= exact_budget_s and weight.dim() == 2:
        eye = torch.eye(n, dtype=weight.dtype, device=weight.device).reshape(n, *weight.shape)
        hess = _dataset_products(model, weight, x, y, loss_fn, eye, batch_size, probe_chunk).reshape(n, n)
        out.trace_exact = float(torch.diagonal(hess).sum())
        out.kappa_nw_exact = float(neuronwise_from_hessian(weight.detach(), hess))
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device: must be cpu, cuda or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device: cuda requested but no GPU is available")
    return torch.device(device)


@dataclass
class LambdaScale:
    """What lambda means for one checkpoint and batch (see docs/flatness.md, "lambda on a scale").

    Attributes:
        fam: the FAM options the ratios refer to (method fam).
        ratio_per_lam: ||grad FAM|| / ||grad Dice|| at lam = 1, ``all`` parameters and per layer.
        authors_ratio_per_lam: the same under the authors' objective (80 * sum Dice, ||W||_F * Tr(H) detached).
        lam_for_ratio: target ratio -> lam giving it (over all parameters).
        lam_equivalent: paper lam -> lam of method fam with the same gradient ratio as the authors' objective.
        lam_penalty_match: paper lam -> lam with the same penalty value, lam_p / 80 / N(W) (norm-dependent).
    """

    fam: FamConfig
    cases: int
    ratio_per_lam: dict[str, float]
    authors_ratio_per_lam: dict[str, float]
    lam_for_ratio: dict[float, float]
    lam_equivalent: dict[float, float]
    lam_penalty_match: dict[float, float]


def lambda_scale(
    model: nn.Module, cfg: Any, x: Tensor, y: Tensor, ratios: Sequence[float], paper_lams: Sequence[float], seed: int = 0,
) -> LambdaScale:
    """Gradient ratios per unit lambda on the batch (x, y) and the lambdas they imply.

    Ours: method fam with the checkpoint's fam options (today's defaults for another method's checkpoint
    that is not fam), whole-batch estimator. The authors': their objective on the same model and batch
    (``skullrec.trainer.objective_scales`` of method fam_authors). Since both ratios are linear in lambda,
    lam_for_ratio = r / ratio_per_lam and lam_equivalent = lam_p * authors_ratio / ratio.
    """
    import dataclasses

    from .config import AUTHORS_FIXED, AUTHORS_LOSS_SCALE, FamConfig
    from .model import loss_function, out_channels

    fam = cfg.fam if cfg.train.method == "fam" else FamConfig(layers=list(cfg.fam.layers))
    fam = dataclasses.replace(fam, lam=1.0, estimator="fd" if fam.estimator in SUBSET_ESTIMATORS else fam.estimator)
    authors = dataclasses.replace(fam, **{k: v for (sec, k), v in AUTHORS_FIXED.items() if sec == "fam"})
    loss_fn = loss_function(cfg.model.loss)
    n_sum = float(x.shape[0] * out_channels(cfg.model.loss))
    ours = grad_ratio(model, x, y, loss_fn, FamRegularizer(fam, model), torch.Generator().manual_seed(seed))
    theirs = grad_ratio(model, x, y, loss_fn, FamRegularizer(authors, model), torch.Generator().manual_seed(seed),
                        loss_scale=AUTHORS_LOSS_SCALE * n_sum, penalty_scale=n_sum)
    model.zero_grad(set_to_none=True)
    w = sum(float(get_w.detach().pow(2).sum()) for get_w in FamRegularizer(fam, model).weights(model))
    norm = w if fam.norm == "squared" else math.sqrt(w)
    return LambdaScale(
        fam=fam, cases=int(x.shape[0]), ratio_per_lam=ours, authors_ratio_per_lam=theirs,
        lam_for_ratio={r: r / ours["all"] for r in ratios},
        lam_equivalent={lp: lp * theirs["all"] / ours["all"] for lp in paper_lams},
        # Same penalty value: lam * N(W) * T(Tr) = (lam_p / 80) * ||W||_F * Tr (divide the authors' objective by 80 * n * C).
        lam_penalty_match={lp: lp / AUTHORS_LOSS_SCALE * math.sqrt(w) / norm for lp in paper_lams},
    )


def flatness_command(
    checkpoint: Path, data: Path, split: str = "train", samples: int = 64, max_cases: int | None = None, device: str = "auto",
    seed: int = 0, ratios: Sequence[float] = (0.01, 0.1), paper_lams: Sequence[float] = (0.0006, 0.002, 0.02),
) -> list[LayerFlatness]:
    """Print Tr(H) (Hutchinson mean +- SE, exact where cheap), ||w||^2, kappa_hat and neuron-wise kappa."""
    from .checkpoint import load_checkpoint
    from .dataset import load_split
    from .model import loss_function

    if samples < 2:
        raise InputError(f"--samples: need at least 2 probes for a standard error, got {samples}")
    dev = _resolve_device(device)
    model, cfg, _meta = load_checkpoint(checkpoint, device=dev)
    model.eval()
    split_data = load_split(data, split, max_cases=max_cases)
    size = getattr(model, "size", None)
    if size is not None and split_data.defective.shape[1:] != (size, size, size):
        raise InputError(f"{data}: volumes are {split_data.defective.shape[1:]}, the model expects {size}^3")
    x = torch.from_numpy(np.ascontiguousarray(split_data.defective[:, None])).float().to(dev)
    y = torch.from_numpy(np.ascontiguousarray(split_data.complete[:, None])).float().to(dev)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = loss_function(cfg.model.loss)
    with torch.no_grad():
        loss_value = float(loss_fn(model(x[:8]), y[:8])) if len(x) else float("nan")
    print(f"checkpoint {checkpoint}  data {data}/{split}: {len(x)} cases, Dice loss (first <=8) {loss_value:.4f}")
    results = []
    for name in cfg.fam.layers:
        r = measure_layer(model, name, x, y, loss_fn, samples, gen)
        results.append(r)
        shape = "x".join(map(str, r.shape))
        print(f"layer {name} ({shape}, {math.prod(r.shape)} weights), {samples} Rademacher probes, {r.seconds_per_probe:.2f} s/probe")
        exact = (
            f"   exact {r.trace_exact:.6g}" if r.trace_exact is not None
            else f"   exact: skipped ({math.prod(r.shape)} products, ~{r.exact_estimate_s:.0f} s > 60 s budget; use fewer --max-cases)"
        )
        print(f"  Tr(H)          {r.trace_mean:.6g} +- {r.trace_se:.2g} (SE){exact}")
        print(f"  ||w||^2        {r.norm_sq:.6g}")
        exact_k = f"   exact {r.norm_sq * r.trace_exact:.6g}" if r.trace_exact is not None else ""
        print(f"  kappa_hat      {r.kappa_hat:.6g} +- {r.kappa_hat_se:.2g} (SE){exact_k}")
        exact_nw = f"   exact {r.kappa_nw_exact:.6g}" if r.kappa_nw_exact is not None else ""
        print(f"  kappa (neuron) {r.kappa_nw_mean:.6g} +- {r.kappa_nw_se:.2g} (SE){exact_nw}")
    if len(x) and (ratios or paper_lams):
        n = min(4, len(x))  # the trainer's batch (metrics.jsonl's fam_grad_ratio uses the first training batch too)
        ls = lambda_scale(model, cfg, x[:n], y[:n], ratios, paper_lams, seed)
        f = ls.fam
        print(f"lambda scale (first {n} cases; method fam: norm {f.norm}, gradient {f.gradient}, trace {f.trace}, estimator {f.estimator})")
        print("  ratio ||grad FAM|| / ||grad Dice|| per unit lambda: "
              + ", ".join(f"{k} {v:.4g}" for k, v in ls.ratio_per_lam.items())
              + "; authors' objective: " + ", ".join(f"{k} {v:.4g}" for k, v in ls.authors_ratio_per_lam.items()))
        for r, lam in ls.lam_for_ratio.items():
            print(f"  lambda for ratio {r:g}: {lam:.4g}")
        for lp in paper_lams:
            print(f"  paper lambda {lp:g} (authors' objective) = lambda {ls.lam_equivalent[lp]:.4g} here by gradient ratio, "
                  f"{ls.lam_penalty_match[lp]:.4g} by penalty value")
    return results


__all__ = [
    "FamTerm",
    "FamRegularizer",
    "ESTIMATORS",
    "register_estimator",
    "rademacher",
    "hessian_vector_products",
    "hutchinson_trace",
    "exact_trace",
    "layer_hessian",
    "kappa_simplified",
    "kappa_neuronwise",
    "neuronwise_from_hessian",
    "neuronwise_quad_forms",
    "fam_term",
    "shape_trace",
    "measure_layer",
    "flatness_command",
    "grad_ratio",
    "lambda_scale",
    "LambdaScale",
    "check_unbiased",
    "SUBSET_ESTIMATORS",
]
