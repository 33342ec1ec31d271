"""Wall time of the trainer's compile trial (skullrec.training.speed.prepare) in this fresh process.

A benchmark, not a test: ``python benchmarks/compile_warmup.py [--amp bf16] [--threads 1]``. The default
64^3 model with the FAM taps attached (as the trainer builds it), batch 4. Run it twice: the first run
after a change of torch or of the model compiles from scratch, later runs find inductor's kernels in its
on-disk cache (what each run of ``skullrec experiment``, one process per run, pays).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from step_cost import make_batch

    from skullrec.config import FamConfig, ModelConfig
    from skullrec.flatness.regularizer import FamRegularizer
    from skullrec.nets.autoencoder import build_model, loss_function
    from skullrec.training import speed

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # as the trainer (train.deterministic)
    x, y = make_batch(4, 64, torch.device("cpu"))
    model = build_model(ModelConfig(), seed=0)
    model.train()
    FamRegularizer(FamConfig(lam=0.002), model)
    t = time.perf_counter()
    _, compiled = speed.prepare(model, True, args.amp, (x, y), loss_function())
    load = os.getloadavg()
    print(f"compiled {compiled}: trial step (compile) {time.perf_counter() - t:.1f} s, amp {args.amp}, "
          f"threads {args.threads}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
