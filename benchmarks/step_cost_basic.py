"""Cost of one training step per method on the CPU, as a ratio to the plain (baseline) step.

A benchmark, not a test: ``python benchmarks/step_cost_basic.py [--steps 10] [--batch 4] [--size 64]``.
Runs skullrec.training.trainer.train_step exactly as training does (Dice loss, Adam, default 64^3 model) on
random shells, the methods interleaved round by round so that load changes on a shared machine hit
all of them alike; prints the median seconds per step and the ratio to the baseline median.
The full issue-6 benchmark (every FAM mode, memory, GPU) is benchmarks/step_cost.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.losses import DiceLoss

from skullrec.config import Config
from skullrec.flatness.regularizer import FamRegularizer
from skullrec.nets.autoencoder import build_model
from skullrec.training.trainer import make_optimizer, train_step


def _shells(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hollow spheres (complete) with a cap cut away (defective), (n, 1, S, S, S) float32."""
    g = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    xs, ys = [], []
    for _ in range(n):
        c = (size - 1) / 2 + torch.rand(3, generator=gen) * 4 - 2
        r = size * (0.33 + 0.08 * torch.rand(1, generator=gen))
        d = (g - c[:, None, None, None]).norm(dim=0)
        complete = (d < r) & (d > r - 3)
        defective = complete & (g[2] - c[2] < r * 0.6)
        xs.append(defective)
        ys.append(complete)
    return torch.stack(xs)[:, None].float(), torch.stack(ys)[:, None].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = _shells(args.batch, args.size, torch.Generator().manual_seed(0))
    loss_fn = DiceLoss(sigmoid=True)

    methods = {
        "baseline": dict(method="baseline"),
        "fam (full gradient)": dict(method="fam", gradient="full"),
        "fam (trace detached)": dict(method="fam", gradient="detached"),
        "sam": dict(method="sam"),
    }
    runners = {}
    for label, spec in methods.items():
        cfg = Config()
        cfg.model.size = args.size
        cfg.train.method = spec["method"]
        if spec["method"] == "fam":
            cfg.fam.lam = 0.01
            cfg.fam.gradient = spec["gradient"]
        model = build_model(cfg.model, seed=0)
        opt = make_optimizer(cfg, model)
        reg = FamRegularizer(cfg.fam, model) if spec["method"] == "fam" else None
        gen = torch.Generator().manual_seed(1)

        def step(model=model, opt=opt, reg=reg, gen=gen, cfg=cfg) -> None:
            train_step(model, x, y, loss_fn, opt, reg=reg, lam=cfg.fam.lam, sam=cfg.train.method == "sam", generator=gen)

        runners[label] = step
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.steps + 2):
        for label, step in runners.items():
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[label].append(time.perf_counter() - t0)
    base = statistics.median(times["baseline"])
    print(f"step cost on CPU ({args.threads} threads, torch {torch.__version__}), batch {args.batch}, {args.size}^3, "
          f"median of {args.steps} steps")
    print(f"{'method':<24}{'s/step':>10}{'x baseline':>12}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<24}{med:>10.3f}{med / base:>12.2f}")


if __name__ == "__main__":
    main()
