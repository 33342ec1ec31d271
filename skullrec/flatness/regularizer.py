"""The FAM regulariser used by the trainer (:class:`FamRegularizer`) and the table of its penalty estimators."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import FamConfig
from ..errors import ConfigError, short_repr
from . import fast
from .hessian import GRADIENTS, NORMS, TRACES, FamTerm, _check_option


@dataclass(frozen=True)
class Estimator:
    """One way to compute the FAM term: ``fn(reg, model, x, y, loss_fn, loss, generator) -> FamTerm``.

    ``taps``: it reads the trainer's forward pass through hooks, which must be attached when the
    regulariser is built, before any forward pass, so they record from the first step on (a first
    step that had to recompute the forward pass would sum the gradients in another order: not
    bit-identical to a resumed run).
    """

    fn: Callable[..., FamTerm]
    taps: bool = False


# fam.estimator -> how the term is computed ("autograd" uses the loss's own graph; see skullrec.flatness.fast).
ESTIMATORS: dict[str, Estimator] = {
    "autograd": Estimator(fast.autograd_estimator),
    "outspace": Estimator(fast.outspace_estimator, taps=True),
    "fd": Estimator(functools.partial(fast.fd_estimator, fraction=1.0, name="fd"), taps=True),
    "fd-half": Estimator(functools.partial(fast.fd_estimator, fraction=0.5, name="fd-half"), taps=True),
    "fd-quarter": Estimator(functools.partial(fast.fd_estimator, fraction=0.25, name="fd-quarter"), taps=True),
}


class FamRegularizer:
    """lam * kappa_hat of the Linear layers named in ``cfg.layers``; ``reg(...)`` gives the FamTerm.

    Raises ConfigError for an unknown layer (listing the available ones), an unknown estimator, or
    ``lam > 0`` with ``gradient="full"`` on a model with InstanceNorm3d (wrong third-order gradient in
    torch 2.13; with lam = 0 the regulariser only monitors Tr(H), which is right).
    """

    def __init__(self, cfg: FamConfig, model: nn.Module, world_size: int = 1) -> None:
        """``world_size``: the DDP processes that will each estimate on their own shard (for check_unbiased)."""
        from ..nets.autoencoder import get_linear

        self.cfg = cfg
        self.layers = list(cfg.layers)
        for name in self.layers:
            get_linear(model, name)
        for key, value, allowed in (("gradient", cfg.gradient, GRADIENTS), ("norm", cfg.norm, NORMS), ("trace", cfg.trace, TRACES)):
            _check_option(key, value, allowed)
        if cfg.estimator not in ESTIMATORS:
            raise ConfigError(f"fam.estimator: unknown estimator {short_repr(cfg.estimator)} (available: {', '.join(ESTIMATORS)})")
        if ESTIMATORS[cfg.estimator].taps:
            fast.prepare_taps(model)
        check_unbiased(cfg, world_size)
        if cfg.lam > 0 and cfg.gradient == "full" and any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in model.modules()):
            raise ConfigError(
                "fam.gradient: 'full' needs third derivatives, which torch computes wrongly through InstanceNorm; "
                "use model.norm=group (same forward) or fam.gradient=detached"
            )

    def weights(self, model: nn.Module) -> list[Tensor]:
        """The regularised weight tensors, looked up by name on ``model`` (which may be a DDP wrapper)."""
        from ..nets.autoencoder import get_linear

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
        return ESTIMATORS[self.cfg.estimator].fn(self, model, x, y, loss_fn, loss, generator)


# Estimators that evaluate the curvature on a random subset of the batch: their *signed* estimate is
# unbiased for the batch's v^T H v, but |.| or max(., 0) of a subset's estimate is not the shaped batch
# value (E|q_subset| >= |E q_subset|, and the per-sample traces need not share a sign).
SUBSET_ESTIMATORS = ("fd-half", "fd-quarter")


def check_unbiased(cfg: FamConfig, world_size: int = 1) -> None:
    """Refuse (ConfigError) a regularising configuration whose penalty would be a biased estimate.

    fam.trace abs / relu shape a *subset's* estimate when the estimator draws a random part of the batch,
    or when DDP ranks each shape their own shard's estimate before averaging: both are biased against
    the shaped whole-batch value (measured in docs/explanation/performance.md). Monitoring (lam = 0) only reads the
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


def grad_ratio(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], reg: FamRegularizer,
               generator: torch.Generator | None = None, *, lam: float = 1.0, loss_scale: float = 1.0,
               penalty_scale: float = 1.0) -> dict[str, float]:
    """||grad(lam * penalty_scale * penalty)|| / ||grad(loss_scale * loss)|| on one batch, over all parameters and per layer.

    Keys: ``all`` (every parameter of the model) and each regularised layer's name (its weight only).
    The gradients are taken with ``torch.autograd.grad``: nothing accumulates in ``.grad``, and the
    model's weights are untouched. ``lam = 1`` gives the ratio per unit lambda (ratio is linear in lam).
    """
    return ratio_and_term(model, x, y, loss_fn, reg, generator, lam=lam, loss_scale=loss_scale, penalty_scale=penalty_scale)[0]


def ratio_and_term(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], reg: FamRegularizer,
                   generator: torch.Generator | None = None, *, lam: float = 1.0, loss_scale: float = 1.0,
                   penalty_scale: float = 1.0) -> tuple[dict[str, float], FamTerm]:
    """:func:`grad_ratio` and the regulariser term it evaluated (its trace and norm serve as monitoring values)."""
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
    return out, term


__all__ = ["Estimator", "ESTIMATORS", "FamRegularizer", "SUBSET_ESTIMATORS", "check_unbiased", "grad_ratio", "ratio_and_term"]
