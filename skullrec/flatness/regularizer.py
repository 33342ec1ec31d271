"""The FAM regulariser used by the trainer (:class:`FamRegularizer`) and the table of its penalty estimators."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import FamConfig
from ..errors import ConfigError
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

    def __init__(self, cfg: FamConfig, model: nn.Module) -> None:
        from ..nets.autoencoder import get_linear

        self.cfg = cfg
        self.layers = list(cfg.layers)
        for name in self.layers:
            get_linear(model, name)
        for key, value, allowed in (("gradient", cfg.gradient, GRADIENTS), ("norm", cfg.norm, NORMS), ("trace", cfg.trace, TRACES)):
            _check_option(key, value, allowed)
        if cfg.estimator not in ESTIMATORS:
            raise ConfigError(f"fam.estimator: unknown estimator {cfg.estimator!r} (available: {', '.join(ESTIMATORS)})")
        if ESTIMATORS[cfg.estimator].taps:
            fast.prepare_taps(model)
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


__all__ = ["Estimator", "ESTIMATORS", "FamRegularizer"]
