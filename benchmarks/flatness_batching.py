"""Hutchinson probes: one batched double backward (is_grads_batched) vs a Python loop over probes.

Prints the time of k probes both ways on a small tanh MLP and, for SkullAutoEncoder at a small size,
whether the batched path runs at all (in torch 2.13 GroupNorm's double backward has no vmap rule),
and the loop's time per probe. Run:  .venv/bin/python benchmarks/flatness_batching.py
"""

from __future__ import annotations

import time

import torch

import skullrec.flatness.hessian as fl
from skullrec.config import ModelConfig
from skullrec.nets.autoencoder import build_model, loss_function


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 32, generator=g), torch.randn(256, 8, generator=g)
    w1 = torch.randn(64, 32, generator=g, requires_grad=True)
    w2 = torch.randn(8, 64, generator=g, requires_grad=True)
    for graph in (True, False):
        for k in (8, 64, 512):
            probes = fl.rademacher(k, w1, g)
            res = {}
            for mode in (True, False):
                fl.BATCHED_PROBES = mode

                def run():
                    loss = ((torch.tanh(x @ w1.T) @ w2.T - y) ** 2).mean()
                    tr = fl.hutchinson_trace(loss, w1, probes=probes, create_graph=graph)[0]
                    if graph:
                        tr.backward()

                res[mode] = timed(run)
            what = "trace + its gradient" if graph else "trace only (no graph)"
            print(f"MLP 32-64-8, {k:3d} probes, {what}: batched {res[True]*1e3:7.1f} ms, "
                  f"loop {res[False]*1e3:7.1f} ms, loop/batched {res[False]/res[True]:.2f}")

    model = build_model(ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2]), seed=0)
    xb = (torch.rand(2, 1, 32, 32, 32, generator=g) > 0.6).float()
    probes = fl.rademacher(4, model.decodeL.weight, g)
    fl.BATCHED_PROBES = True
    try:
        fl.hutchinson_trace(loss_function()(model(xb), xb), model.decodeL.weight, probes=probes)
        print("SkullAutoEncoder: batched probes run")
    except RuntimeError as exc:
        print(f"SkullAutoEncoder: batched probes fail: {str(exc).splitlines()[0][:120]}")
    fl.BATCHED_PROBES = False
    t = timed(lambda: fl.hutchinson_trace(loss_function()(model(xb), xb), model.decodeL.weight, probes=probes)[0].backward())
    print(f"SkullAutoEncoder 32^3 (channels 4,8,16,8), batch 2: loop, 4 probes + gradient: {t:.2f} s")


if __name__ == "__main__":
    main()
