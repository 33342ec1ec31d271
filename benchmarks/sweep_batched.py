"""Seeds of a sweep trained together (skullrec.training.batched: stacked weights, vmap or loop forward) against one after another.

    python benchmarks/sweep_batched.py [--runs 3] [--sizes 32 64] [--steps 6] [--threads 2]

For each volume size: ``--runs`` baseline models (seeds 0..runs-1, the default architecture scaled to the
size, batch 4), timed over ``--steps`` steps each way, the three ways interleaved step by step so that a
change in the machine's load hits all alike: sequential = ``trainer.train_step`` on each model in
turn (what separate runs do, minus process start-up and data loading), loop / vmap = one
``batched.batched_step`` for all with ``StackedModels(forward="loop")`` (the CPU default, bit-for-bit
the runs alone) or ``forward="vmap"`` (the GPU default). Prints ms per step of all runs, the ratios to
sequential, whether loop ended bit-for-bit equal to sequential, and the load average. The first two
steps of each way are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from skullrec.config import ModelConfig, load_config
from skullrec.nets.autoencoder import build_model, loss_function
from skullrec.training.batched import StackedModels, batched_step
from skullrec.training.trainer import make_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    print(f"{args.runs} runs, batch 4, {args.threads} torch threads, {args.steps} timed steps; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'size':>5} {'sequential ms':>14} {'loop ms':>8} {'vmap ms':>8} {'loop/seq':>9} {'vmap/seq':>9}  loop bit-for-bit")
    for size in args.sizes:
        n_stages = 5 if size >= 64 else 3
        chans = [20, 40, 80, 160, 8][-n_stages:] if size >= 64 else [20, 40, 8]
        cfg = load_config(None, [f"model.size={size}", f"model.channels={chans}", f"model.strides={[2] * n_stages}",
                                 "train.method=baseline", "train.lr=1e-4"])
        models = [build_model(cfg.model, seed=s) for s in range(args.runs)]
        alone = [copy.deepcopy(m) for m in models]
        opts = [make_optimizer(cfg, m) for m in alone]
        stacks = {mode: StackedModels([copy.deepcopy(m) for m in models], forward=mode) for mode in ("loop", "vmap")}
        sopts = {mode: make_optimizer(cfg, st) for mode, st in stacks.items()}
        loss_fn = loss_function(cfg.model.loss)
        gen = torch.Generator().manual_seed(0)
        xs = (torch.rand(args.runs, 4, 1, size, size, size, generator=gen) > 0.7).float()
        ys = torch.clamp(xs + (torch.rand(xs.shape, generator=gen) > 0.95).float(), 0, 1)
        times: dict[str, list[float]] = {"seq": [], "loop": [], "vmap": []}
        for step in range(args.steps + 2):
            t0 = time.perf_counter()
            for i, (m, o) in enumerate(zip(alone, opts)):
                train_step(m, xs[i], ys[i], loss_fn, o).loss.item()
            t = {"seq": time.perf_counter() - t0}
            for mode in ("loop", "vmap"):
                t0 = time.perf_counter()
                batched_step(stacks[mode], xs, ys, loss_fn, sopts[mode]).sum().item()
                t[mode] = time.perf_counter() - t0
            if step >= 2:
                for k, v in t.items():
                    times[k].append(v)
        ms = {k: 1000 * sum(v) / len(v) for k, v in times.items()}
        same = all(torch.equal(stacks["loop"].state_dict(i)[k], v) for i, m in enumerate(alone) for k, v in m.state_dict().items())
        print(f"{size:>5} {ms['seq']:14.0f} {ms['loop']:8.0f} {ms['vmap']:8.0f} {ms['loop'] / ms['seq']:9.2f} {ms['vmap'] / ms['seq']:9.2f}  {same}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
