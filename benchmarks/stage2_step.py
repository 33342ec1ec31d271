"""Seconds per stage-2 training step on this machine (default UNet and grid of configs/stage2.yaml).

One step = forward, Dice + BCE loss, backward and Adam update on a batch of random inputs (the cost
does not depend on the values). Prints the median of --steps steps after one warm-up step and the
steps one hour allows.

    .venv/bin/python benchmarks/stage2_step.py [--grid 128] [--batch 1] [--threads 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from skullrec.nets.implant_net import ImplantNetConfig, build_implant_net
from skullrec.training.stage2 import _loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ImplantNetConfig(grid=args.grid)
    model = build_implant_net(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((args.batch, 2, args.grid, args.grid, args.grid), generator=g)
    y = (torch.rand((args.batch, 1, args.grid, args.grid, args.grid), generator=g) > 0.9).float()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss, _ = _loss(model(x), y, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"UNet {cfg.channels} grid {args.grid}^3 batch {args.batch}, {n_params} parameters, {args.threads} threads: "
          f"median {med:.2f} s per step over {args.steps} ({', '.join(f'{t:.2f}' for t in times)}) -> {3600 / med:.0f} steps per hour")


if __name__ == "__main__":
    main()
