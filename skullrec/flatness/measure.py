"""``skullrec flatness``: Tr(H), ||w||^2, kappa-hat and neuron-wise kappa of a checkpoint's layers on a data set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..utils import resolve_device
from .hessian import MAX_EXACT_WEIGHTS, _grads, hessian_vector_products, neuronwise_from_hessian, neuronwise_quad_forms, rademacher

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
    from ..nets.autoencoder import get_linear

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




@dataclass
class FlatnessReport:
    """What :func:`measure_checkpoint` measured: the number of cases, the mean Dice loss of the first <= 8, each layer."""

    cases: int
    loss: float
    layers: list[LayerFlatness]


def measure_checkpoint(
    checkpoint: Path, data: Path, split: str = "train", samples: int = 64, max_cases: int | None = None, device: str = "auto",
    seed: int = 0,
) -> FlatnessReport:
    """Tr(H) (Hutchinson mean +- SE, exact where cheap), ||w||^2, kappa_hat and neuron-wise kappa of the checkpoint's FAM layers."""
    from ..data.layout import load_split
    from ..nets.autoencoder import loss_function
    from ..nets.checkpoint import load_checkpoint

    dev = resolve_device(device)
    model, cfg, _meta = load_checkpoint(checkpoint, device=dev)
    model.eval()
    split_data = load_split(data, split, max_cases=max_cases)
    size = getattr(model, "size", None)
    if size is not None and split_data.defective.shape[1:] != (size, size, size):
        raise InputError(f"{data}: volumes are {split_data.defective.shape[1:]}, the model expects {size}^3")
    x = torch.from_numpy(np.ascontiguousarray(split_data.defective[:, None])).float().to(dev)
    y = torch.from_numpy(np.ascontiguousarray(split_data.complete[:, None])).float().to(dev)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = loss_function()
    with torch.no_grad():
        loss_value = float(loss_fn(model(x[:8]), y[:8])) if len(x) else float("nan")
    layers = [measure_layer(model, name, x, y, loss_fn, samples, gen) for name in cfg.fam.layers]
    return FlatnessReport(cases=len(x), loss=loss_value, layers=layers)


__all__ = ["LayerFlatness", "measure_layer", "FlatnessReport", "measure_checkpoint"]
