"""``skullrec flatness``: Tr(H), ||w||^2, kappa-hat and neuron-wise kappa of a checkpoint's layers on a data set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import FamConfig
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
class LambdaScale:
    """What lambda means for one checkpoint and batch (see docs/explanation/fam.md, "lambda on a scale").

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

    from ..config import AUTHORS_FIXED, AUTHORS_LOSS_SCALE, FamConfig
    from ..nets.autoencoder import loss_function, out_channels
    from .regularizer import SUBSET_ESTIMATORS, FamRegularizer, grad_ratio

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


@dataclass
class FlatnessReport:
    """What :func:`measure_checkpoint` measured: the number of cases, the mean Dice loss of the first <= 8, each layer."""

    cases: int
    loss: float
    layers: list[LayerFlatness]
    lambdas: LambdaScale | None = None


def measure_checkpoint(
    checkpoint: Path, data: Path, split: str = "train", samples: int = 64, max_cases: int | None = None, device: str = "auto",
    seed: int = 0, ratios: Sequence[float] = (0.01, 0.1), paper_lams: Sequence[float] = (0.0006, 0.002, 0.02),
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
    loss_fn = loss_function(cfg.model.loss)
    with torch.no_grad():
        loss_value = float(loss_fn(model(x[:8]), y[:8])) if len(x) else float("nan")
    layers = [measure_layer(model, name, x, y, loss_fn, samples, gen) for name in cfg.fam.layers]
    lambdas = None
    if len(x) and (ratios or paper_lams):
        n = min(4, len(x))  # the trainer's batch (metrics.jsonl's fam_grad_ratio uses the first training batch too)
        lambdas = lambda_scale(model, cfg, x[:n], y[:n], ratios, paper_lams, seed)
    return FlatnessReport(cases=len(x), loss=loss_value, layers=layers, lambdas=lambdas)


__all__ = ["LayerFlatness", "measure_layer", "FlatnessReport", "measure_checkpoint", "LambdaScale", "lambda_scale"]
