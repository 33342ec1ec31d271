"""Seconds per stage-2 training step on this machine (default UNet and grid of configs/stage2.yaml).

One step = forward (fp32, or bf16 autocast as ``train.amp: bf16``), Dice + BCE loss, backward and
Adam update on a batch of random inputs (the cost does not depend on the values), exactly as
``skullrec.training.stage2.train_implant`` does it. fp32 and bf16 steps are interleaved in one
process, so the bf16/fp32 ratio is robust to other load on the machine; the load average is printed
beside it. Prints the medians after one warm-up step each and the steps one hour allows.

    .venv/bin/python benchmarks/stage2_step.py [--grid 128] [--batch 1] [--threads 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from skullrec.config import ImplantNetConfig
from skullrec.nets.autoencoder import loss_function
from skullrec.nets.implant_net import build_implant_net
from skullrec.training.stage2 import _loss
from skullrec.training.trainer import amp_context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ImplantNetConfig(grid=args.grid)
    dice_fn = loss_function("sigmoid_dice")  # as train_implant: one output channel
    models = {amp: build_implant_net(cfg, seed=0) for amp in ("none", "bf16")}
    opts = {amp: torch.optim.Adam(m.parameters(), lr=1e-3) for amp, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.rand((args.batch, 2, args.grid, args.grid, args.grid), generator=g)
    y = (torch.rand((args.batch, 1, args.grid, args.grid, args.grid), generator=g) > 0.9).float()
    times: dict[str, list[float]] = {"none": [], "bf16": []}
    for i in range(args.steps + 1):
        for amp, model in models.items():  # interleaved: both see the same load
            t0 = time.perf_counter()
            with amp_context(amp, x.device):
                logits = model(x)
            loss, _ = _loss(logits.float(), y, 1.0, dice_fn)
            opts[amp].zero_grad(set_to_none=True)
            loss.backward()
            opts[amp].step()
            if i:
                times[amp].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in models["none"].parameters())
    print(f"UNet {cfg.channels} grid {args.grid}^3 batch {args.batch}, {n_params} parameters, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}:")
    med = {amp: statistics.median(t) for amp, t in times.items()}
    for amp, t in times.items():
        print(f"  amp {amp:4s}: median {med[amp]:.2f} s per step over {args.steps} ({', '.join(f'{v:.2f}' for v in t)})"
              f" -> {3600 / med[amp]:.0f} steps per hour")
    print(f"  bf16 / fp32 step time: {med['bf16'] / med['none']:.2f}")


if __name__ == "__main__":
    main()
