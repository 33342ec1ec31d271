"""Lookbehind-SAM (Mordido et al., ICML 2024, "Lookbehind-SAM: k steps back, 1 step forward") around any
torch optimizer.

One Lookbehind step on a batch starts from the slow weights phi and makes k SAM-like inner steps whose
ascents *accumulate* (each ascent starts from the previous ascent point, not from phi), while the base
optimizer moves a separate copy, the fast weights theta, with the gradients found at those points::

    p_0 = theta_0 = phi
    for i = 1..k:
        p_i     = p_{i-1} + rho * g(p_{i-1}) / ||g(p_{i-1})||      (ascent, accumulating)
        theta_i = base_step(theta_{i-1}, g(p_i))                    (descent of the fast weights)
    phi <- phi + alpha * (theta_k - phi)                             (the "1 step forward")

with g the gradient of the batch loss. k = 1, alpha = 1 is plain SAM. The base optimizer (Adam here)
takes k steps per batch, so its moments see all k gradients, as in the authors' code, which wraps the
base optimizer the same way.

Cost: the authors' loop evaluates two gradients per inner step (one for the ascent, one for the
descent) at the same point p_i; with a deterministic forward pass (no dropout, GroupNorm) those two are
the same gradient, so this implementation evaluates g(p_i) once and uses it for both: k + 1 forward/
backward passes per batch instead of 2k (k = 2: 3 instead of 4).

Defaults follow the paper and its code: k = 2 (the repository's example command), alpha = 0.5 (the
paper's static alpha grid is {0.2, 0.5, 0.8}), rho = 0.05 (SAM's radius). ``alpha="adaptive"`` is the
paper's adaptive alpha: (1 + cos(theta_1 - phi, theta_k - phi)) / 2, computed per parameter tensor as
in the authors' code, i.e. a tensor moves less when its later inner steps turned away from its first one.

Between two batches the wrapper holds no state of its own (phi is simply the model's weights), so
checkpoints and resume store the base optimizer's state dict, exactly as for SAM.

Usage::

    opt = Lookbehind(model.parameters(), torch.optim.Adam, rho=0.05, k=2, alpha=0.5, lr=1e-4)
    def closure():
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
    closure()            # the gradient at phi
    opt.step(closure)    # k more gradients, k base steps, the interpolation
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .sam import WrappedOptimizer


class Lookbehind(WrappedOptimizer):
    """Lookbehind-SAM around ``base_optimizer_cls(self.param_groups, **base_kwargs)``."""

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 k: int = 2, alpha: float | str = 0.5, **base_kwargs: Any) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k}")
        if alpha != "adaptive" and not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1] or 'adaptive', got {alpha!r}")
        super().__init__(params, base_optimizer_cls, rho, {}, **base_kwargs)
        self.k = int(k)
        self.alpha = alpha

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _ascend(self, params: list[torch.Tensor]) -> None:
        """p <- p + rho * g / ||g|| with one norm over all parameters (one ball for the whole model)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.stack([g.norm(p=2).to(grads[0].device) for g in grads]).norm(p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad * scale.to(p.device))

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One Lookbehind step. ``.grad`` must hold the gradient at the current (slow) weights; ``closure``
        zeroes the gradients, recomputes the loss at the current weights and calls ``backward()``.
        Returns the loss of the last closure call (at the k-th ascent point)."""
        if closure is None:
            raise ValueError("Lookbehind.step needs a closure that recomputes the loss and calls backward()")
        params = self._params()
        with torch.no_grad():
            slow = [p.detach().clone() for p in params]
            fast = [p.detach().clone() for p in params]
        first: list[torch.Tensor] | None = None
        loss = torch.zeros(())
        for i in range(self.k):
            self._ascend(params)  # uses g(p_{i}) already in .grad, moves the model to p_{i+1}
            with torch.enable_grad():
                loss = closure()  # g(p_{i+1})
            with torch.no_grad():
                point = [p.detach().clone() for p in params]
                for p, f in zip(params, fast):
                    p.copy_(f)
            # The base optimizer steps the fast weights with the gradient found at the ascent point.
            self.base_optimizer.step()
            with torch.no_grad():
                for p, f, q in zip(params, fast, point):
                    f.copy_(p)
                    p.copy_(q)
                if i == 0 and self.alpha == "adaptive":
                    first = [f.clone() for f in fast]
        with torch.no_grad():
            for j, (p, s, f) in enumerate(zip(params, slow, fast)):
                # The adaptive alpha stays a device tensor: no host sync inside a training step.
                alpha = _adaptive_alpha(s, first[j], f) if first is not None else float(self.alpha)
                p.copy_(s + alpha * (f - s))
        return loss


def _adaptive_alpha(slow: torch.Tensor, first: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """(1 + cos(theta_1 - phi, theta_k - phi)) / 2 of one parameter tensor, a 0-d tensor in [0, 1]."""
    cos = torch.nn.functional.cosine_similarity((first - slow).flatten(), (fast - slow).flatten(), dim=0, eps=1e-12)
    return (1.0 + cos) / 2.0


__all__ = ["Lookbehind"]
