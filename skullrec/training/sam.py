"""SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021) as a wrapper around any torch optimizer.

One SAM step is two forward/backward passes:

1. ``first_step``: with g = dL/dw at w, move to the (approximate) worst point of the rho-ball,
   w + e with  e = rho * T^2 g / ||T g||  where T = 1 (SAM) or T = |w| + eta (ASAM, element-wise:
   the ball is measured relative to each weight's size, which makes it invariant to rescalings of
   the weights);
2. recompute the gradient at w + e, then ``second_step``: go back to w and let the base optimizer
   step with that gradient.

The norm ||T g|| is over all parameters of all groups together (one ball for the whole model).
``rho``, ``adaptive`` and ``eta`` may also be set per parameter group.

Usage::

    opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, adaptive=False, lr=1e-4)
    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    """An optimizer that steps ``base_optimizer_cls(self.param_groups, **base_kwargs)`` at perturbed weights.

    The base optimizer holds the state worth saving (e.g. Adam's moments); the wrapper's own state is
    empty between steps, so checkpoints store and restore the base optimizer's state dict.
    """

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float,
                 defaults: dict[str, Any], **base_kwargs: Any) -> None:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        super().__init__(params, dict(defaults, rho=rho, **base_kwargs))
        # The base optimizer shares our param groups, so learning-rate schedulers and state_dict see one set.
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


class SAM(WrappedOptimizer):
    """Sharpness-aware minimisation around ``base_optimizer_cls(self.param_groups, **base_kwargs)``."""

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(params, base_optimizer_cls, rho, dict(adaptive=adaptive, eta=eta), **base_kwargs)

    @staticmethod
    def _scale(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor | float:
        """T for one parameter: 1 (SAM) or |w| + eta (ASAM)."""
        return p.detach().abs() + group["eta"] if group["adaptive"] else 1.0

    def _grad_norm(self) -> torch.Tensor:
        """||T g|| over all parameters with a gradient."""
        norms = [
            (self._scale(p, group) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to w + e (see the module docstring) and remember w."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                t = self._scale(p, group)
                e = (t * t) * p.grad * scale.to(p.device)
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and take the base optimizer's step with the gradient computed at w + e."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Both steps. The gradients at w must already be in ``.grad``; ``closure`` recomputes the loss
        at w + e and calls ``backward()`` on it, and its loss is returned."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss



__all__ = ["SAM", "WrappedOptimizer"]
