"""The FAM regulariser used by the trainer (:class:`FamRegularizer`) and its table of penalty estimators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import FamConfig
from ..errors import ConfigError
from .hessian import GRADIENTS, NORMS, TRACES, FamTerm, _check_option, fam_term

# ----------------------------------------------------------------------------------------------
# The regulariser used by the trainer, with a registry of estimators of the penalty.

# An estimator computes the FamTerm for FamRegularizer ``reg`` on a batch. "autograd" (below) uses
# the loss's own graph; faster ones (skullrec.flatness.fast) register themselves with register_estimator.
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
        from ..nets.autoencoder import get_linear

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
        # An estimator may need to see the forward passes (skullrec.flatness.fast records them with hooks).
        prepare = getattr(ESTIMATORS[cfg.estimator], "prepare", None)
        if prepare is not None:
            prepare(model)
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
        return ESTIMATORS[self.cfg.estimator](self, model, x, y, loss_fn, loss, generator)


def _load_plugins() -> None:
    """Import optional modules that register more estimators (absent ones are skipped)."""
    import importlib

    for mod in ("skullrec.flatness.fast",):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
