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
(see docs/explanation/fam.md for what each changes and why the default was chosen):

* ``gradient="full"`` differentiates ||w||^2 * Tr(H) as written; ``"detached"`` treats Tr(H) as a
  constant (like the authors' public code), so the penalty acts on w only, via its norm, and costs no
  third-order backward;
* ``norm="squared"`` uses ||w||^2 (paper); ``"frobenius"`` uses ||w|| (public code);
* ``trace="signed" | "abs" | "relu"``: Tr(H) as is, |Tr(H)|, or max(Tr(H), 0). With Dice loss Tr(H)
  is negative at initialisation, so minimising ||w||^2 Tr(H) as written is unbounded below.

Hessian-vector products use reverse-over-reverse autograd, one backward per probe (the first
gradient is shared by all probes); :data:`BATCHED_PROBES` can push all probes through one batched
backward instead (measured in benchmarks/flatness_batching.py, numbers in docs/explanation/fam.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, InputError, check_choice

# Dense layer Hessians need one Hessian-vector product per weight and numel^2 memory: refuse above this.
MAX_EXACT_WEIGHTS = 4096
# How several probes are pushed through the double backward:
#   False   a Python loop, one backward per probe (the default, see below);
#   True    one batched backward (``is_grads_batched``, i.e. vmap over the backward);
#   "auto"  batched, falling back to the loop (for the rest of the process) when torch has no batching
#           rule for some op in the graph.
# Measured (benchmarks/flatness_batching.py, torch 2.13 CPU, numbers in docs/explanation/fam.md): batching fails
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
    check_choice(f"fam.{key}", value, allowed, ConfigError)


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


def kappa_simplified(loss: Tensor, weights: Tensor | Sequence[Tensor], **options: Any) -> Tensor:
    """kappa_hat = sum over layers of ||w||^2 * Tr(H) (Hutchinson): the penalty of :func:`fam_term` with the same options."""
    return fam_term(loss, weights, **options).penalty


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


__all__ = [
    "FamTerm",
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
]
