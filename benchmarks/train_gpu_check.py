"""GPU check of the trainer (not a test): device placement, host syncs in the step, resume, epoch times.

``python benchmarks/train_gpu_check.py [--out DIR]`` on a machine with CUDA. Writes a small 64^3 data
set of shells, then for baseline / fam / sam:

1. runs ``train_step`` under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the
   host-synchronising calls it makes (the trainer promises none of its own);
2. trains 3 epochs (16 cases, batch 4) and prints the seconds per epoch from metrics.jsonl;
3. interrupts a run with SIGINT in the middle of epoch 2, resumes it, and prints the largest weight
   difference to the uninterrupted run (deterministic settings only).

SimpleITK is only needed for NRRD files; where it is missing (the GPU image) a stub is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

if importlib.util.find_spec("SimpleITK") is None:  # NIfTI-only use: io.py imports it at the top
    sys.modules["SimpleITK"] = types.ModuleType("SimpleITK")

import numpy as np
import torch
from safetensors.torch import load_file

from skullrec.cli import train_command
from skullrec.data.layout import write_case

REPO = Path(__file__).resolve().parents[1]


def _shells(root: Path, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    g = np.indices((size,) * 3, dtype=np.float32)
    for split, k in (("train", 16), ("eval_set1", 4), ("eval_set2", 4)):
        for i in range(k):
            c = (size - 1) / 2 + rng.uniform(-3, 3, 3)
            r = size * rng.uniform(0.33, 0.42)
            d = np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
            complete = (d < r) & (d > r - 3)
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            defective = complete & (np.tensordot(axis, g - c[:, None, None, None], axes=1) < 0.6 * r)
            write_case(root, split, f"{i:03d}", complete, defective, np.eye(4))


def _sets(root: Path, method: str, epochs: int, deterministic: bool) -> list[str]:
    return [
        f"data.root={root}", "data.max_train_cases=16", f"train.method={method}", f"train.epochs={epochs}",
        "train.checkpoint_epochs=[1]", "train.val_every=1", f"train.deterministic={str(deterministic).lower()}",
        f"fam.lam={0.002 if method == 'fam' else 0.0}",
    ]


def _sync_count(method: str, root: Path) -> int:
    from monai.losses import DiceLoss

    from skullrec.config import load_config
    from skullrec.data.cache import load_training_data
    from skullrec.flatness.regularizer import FamRegularizer
    from skullrec.nets.autoencoder import build_model
    from skullrec.training.trainer import make_optimizer, train_step

    cfg = load_config(REPO / "configs/smoke.yaml", _sets(root, method, 1, False))
    data = load_training_data(cfg.data, 64, "cuda")
    model = build_model(cfg.model, seed=0).cuda()
    opt = make_optimizer(cfg, model)
    reg = FamRegularizer(cfg.fam, model) if method == "fam" else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    idx = data.epoch_order(0, 1, 4)
    x, y = data.train.batch(idx[0])
    kw = dict(reg=reg, lam=cfg.fam.lam, sam=method == "sam", generator=gen)
    train_step(model, x, y, DiceLoss(sigmoid=True), opt, **kw)  # warm-up (allocations, cuDNN)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(model, x, y, DiceLoss(sigmoid=True), opt, **kw)
    torch.cuda.set_sync_debug_mode("default")
    for w in caught[:3]:
        print(f"    sync: {str(w.message)[:100]} ({Path(w.filename).name}:{w.lineno})")
    return len(caught)


def _interrupted_run(root: Path, method: str, run: Path) -> None:
    """Train with a Ctrl-C (SIGINT to this process) after the 6th step: mid-epoch 2 of 4 steps."""
    import skullrec.training.trainer as T

    orig, calls = T.train_step, [0]

    def step(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    T.train_step = step
    try:
        train_command(config=REPO / "configs/smoke.yaml", overrides=_sets(root, method, 3, True), run_dir=run,
                      resume=None, force=False, device="cuda", overwrite=False)
    except KeyboardInterrupt:
        pass
    finally:
        T.train_step = orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    work = Path(tempfile.mkdtemp())
    root = work / "data"
    t0 = time.perf_counter()
    _shells(root)
    print(f"data set written in {time.perf_counter() - t0:.1f} s")
    rows = []
    for method in ("baseline", "fam", "sam"):
        n_sync = _sync_count(method, root)
        for det in (True, False):
            run = work / f"{method}_{det}"
            t0 = time.perf_counter()
            train_command(config=REPO / "configs/smoke.yaml", overrides=_sets(root, method, 3, det), run_dir=run,
                          resume=None, force=False, device="cuda", overwrite=False)
            wall = time.perf_counter() - t0
            secs = [r["seconds"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
            diff = float("nan")
            if det:
                part = work / f"{method}_part"
                _interrupted_run(root, method, part)
                train_command(config=None, overrides=[], run_dir=None, resume=part, force=False, device="cuda", overwrite=False)
                a, b = load_file(str(run / "last.safetensors")), load_file(str(part / "last.safetensors"))
                diff = max(float((a[k] - b[k]).abs().max()) for k in a)
            rows.append((method, det, n_sync, secs, wall, diff))
    print("\nmethod    deterministic  syncs/step  s/epoch (4 steps + val) e1,e2,e3   run wall s  resume max|dw|")
    for method, det, n_sync, secs, wall, diff in rows:
        print(f"{method:<10}{str(det):<15}{n_sync:<12}{', '.join(f'{s:.3f}' for s in secs):<38}{wall:<12.1f}{diff:.3g}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_gpu_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
