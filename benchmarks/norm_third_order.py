"""Is the gradient of the FAM penalty (a third-order backward) right through each normalisation layer?

Builds SkullAutoEncoder at a small input size in float64 for norm = group and instance (same forward
computation), and compares the autograd directional derivative of ||w||^2 * v^T H v (decodeL, fixed
Rademacher probe, Dice loss) along a random direction of all parameters with a central finite
difference. Prints both, the relative error, and the cosine between the full autograd gradients of
the two models (which share weights). Run:

    .venv/bin/python benchmarks/norm_third_order.py [--size 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call

from skullrec.config import ModelConfig
from skullrec.flatness.hessian import fam_term, rademacher
from skullrec.nets.autoencoder import build_model, loss_function


def penalty_fn(model, x, y, probe):
    """params dict -> ||w||^2 v^T H v of decodeL (full graph)."""
    loss_fn = loss_function()

    def f(params):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        return fam_term(loss, params["decodeL.weight"], probes=[probe], gradient="full", trace="signed").penalty

    return f


def consistent_fd(fun, steps=(1e-7, 1e-8, 1e-9, 1e-10, 1e-11), rtol=1e-5) -> float:
    """Central difference at the largest step that agrees with the next smaller one.

    PReLU/ReLU kinks: a step that carries some pre-activation across 0 changes v^T H v by a jump, and
    the difference quotient is then wrong by jump/step; two consecutive steps agreeing rules that out.
    """
    est = [(fun(h) - fun(-h)) / (2 * h) for h in steps]
    for a, b in zip(est, est[1:]):
        if abs(a - b) <= rtol * max(abs(a), abs(b)):
            return a
    raise RuntimeError(f"finite differences do not settle: {est}")


def check(norm: str, cfg: ModelConfig, seed: int) -> dict:
    """Autograd vs central-difference directional derivative of the FAM penalty for one norm type."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(**{**cfg.__dict__, "norm": norm})
    model = build_model(cfg, seed=seed).double()
    s = cfg.size
    x = (torch.rand(2, 1, s, s, s, generator=g, dtype=torch.float64) > 0.6).double()
    y = torch.clamp(x + (torch.rand(2, 1, s, s, s, generator=g, dtype=torch.float64) > 0.8).double(), 0, 1)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    probe = rademacher(1, base["decodeL.weight"], g)
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}
    f = penalty_fn(model, x, y, probe)
    params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    t0 = time.perf_counter()
    pen = f(params)
    grads = torch.autograd.grad(pen, list(params.values()))
    seconds = time.perf_counter() - t0
    auto = sum(float((gr * direction[k]).sum()) for gr, k in zip(grads, params))

    def at(step):
        p = {k: (v + step * direction[k]).requires_grad_(True) for k, v in base.items()}
        return float(f(p).detach())

    fd = consistent_fd(at)
    return {"norm": norm, "penalty": float(pen.detach()), "autograd": auto, "finite_diff": fd,
            "rel_err": abs(auto - fd) / max(abs(fd), 1e-300), "seconds": seconds,
            "grad": torch.cat([gr.flatten() for gr in grads])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=str, default="20,40,80,8")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ch = [int(c) for c in a.channels.split(",")]
    cfg = ModelConfig(size=a.size, channels=ch, strides=[2] * len(ch), latent_size=8)
    rows = [check(n, cfg, a.seed) for n in ("group", "instance")]
    for r in rows:
        print(f"{r['norm']:9s} penalty {r['penalty']:+.6e}  d/dt autograd {r['autograd']:+.9e}  "
              f"central FD {r['finite_diff']:+.9e}  rel.err {r['rel_err']:.1e}  ({r['seconds']:.1f} s)")
    ga, gb = rows[0]["grad"], rows[1]["grad"]
    cos = float(ga @ gb / (ga.norm() * gb.norm()))
    print(f"cosine(grad group, grad instance) = {cos:.4f}; relative difference {float((ga - gb).norm() / ga.norm()):.3f}")


if __name__ == "__main__":
    main()
