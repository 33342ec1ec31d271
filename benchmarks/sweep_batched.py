"""Seeds of a sweep trained together (skullrec.training.batched, vmap over stacked weights) against one after another.

    python benchmarks/sweep_batched.py [--runs 3] [--sizes 32 64] [--steps 6] [--threads 2]

For each volume size: ``--runs`` baseline models (seeds 0..runs-1, the default architecture scaled to the
size, batch 4), timed over ``--steps`` steps each way, the two ways interleaved step by step so that a
change in the machine's load hits both alike: sequential = ``trainer.train_step`` on each model in
turn (what separate runs do, minus process start-up and data loading), batched = one
``batched.batched_step`` for all. Prints ms per step of all runs, the ratio batched / sequential and
the load average. The first two steps of each way are warm-up and not counted.
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
    print(f"{'size':>5} {'sequential ms':>14} {'batched ms':>11} {'batched/seq':>12}")
    for size in args.sizes:
        n_stages = 5 if size >= 64 else 3
        chans = [20, 40, 80, 160, 8][-n_stages:] if size >= 64 else [20, 40, 8]
        cfg = load_config(None, [f"model.size={size}", f"model.channels={chans}", f"model.strides={[2] * n_stages}",
                                 "train.method=baseline", "train.lr=1e-4"])
        models = [build_model(cfg.model, seed=s) for s in range(args.runs)]
        alone = [copy.deepcopy(m) for m in models]
        opts = [make_optimizer(cfg, m) for m in alone]
        stack = StackedModels(models)
        sopt = make_optimizer(cfg, stack)
        loss_fn = loss_function(cfg.model.loss)
        gen = torch.Generator().manual_seed(0)
        xs = (torch.rand(args.runs, 4, 1, size, size, size, generator=gen) > 0.7).float()
        ys = torch.clamp(xs + (torch.rand(xs.shape, generator=gen) > 0.95).float(), 0, 1)
        seq, bat = [], []
        for step in range(args.steps + 2):
            t0 = time.perf_counter()
            for i, (m, o) in enumerate(zip(alone, opts)):
                train_step(m, xs[i], ys[i], loss_fn, o).loss.item()
            t1 = time.perf_counter()
            batched_step(stack, xs, ys, loss_fn, sopt).sum().item()
            t2 = time.perf_counter()
            if step >= 2:
                seq.append(t1 - t0)
                bat.append(t2 - t1)
        s_ms, b_ms = 1000 * sum(seq) / len(seq), 1000 * sum(bat) / len(bat)
        print(f"{size:>5} {s_ms:14.0f} {b_ms:11.0f} {b_ms / s_ms:12.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
