"""Evidence for the default loss: the sign of Tr(H) of decodeL along training, sigmoid vs softmax Dice.

For each ``model.loss`` (sigmoid_dice, softmax_dice) this trains the 64^3 autoencoder as a baseline with
the project's trainer (``skullrec.cli.train_command``, same seed, same data, same schedule) and
measures the *exact* per-sample Tr(H) of decodeL's weight (float64 copy of the model,
``skullrec.flatness.fast.exact_trace_per_sample``: ||l||^2 Tr(H_z), no Hutchinson noise) on fixed
training cases at initialisation, 10 %, 50 % and the end of training. Then, for the loss whose trace
stays positive, it trains FAM with ``fam.trace=signed`` (the paper's regulariser as written) at the
given lambdas and reports whether it trains stably (finite loss, ||w||^2 not exploding, Tr(H) staying
positive, training loss falling).

    .venv/bin/python benchmarks/trace_sign_losses.py --data data/prepared-skullfix --n-train 16 --epochs 50 \
        --threads 2 --out benchmarks/results/trace_sign_losses.json

Data: ``skullrec prepare`` of real SkullFix skulls (docs/how-to/real-data.md). Modest CPU cost: a few
minutes on 2 threads for the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def per_sample_traces(ckpt: Path | None, cfg, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Exact per-sample Tr(H) of decodeL (float64) for a checkpoint, or the seeded initial model when None."""
    from skullrec.flatness.fast import exact_trace_per_sample
    from skullrec.nets.autoencoder import build_model, loss_function
    from skullrec.nets.checkpoint import load_checkpoint

    model = build_model(cfg.model, seed=cfg.seed) if ckpt is None else load_checkpoint(ckpt)[0]
    model = model.double().train()
    return [float(t) for t in exact_trace_per_sample(model, x.double(), y.double(), loss_function(cfg.model.loss))]


def train_run(name: str, overrides: list[str], out: Path) -> tuple[Path, list[dict]]:
    from skullrec.cli import train_command

    run_dir = out / name
    train_command(config=ROOT / "configs" / "baseline.yaml", overrides=overrides, run_dir=run_dir, resume=None,
                  force=False, device="cpu", overwrite=True)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return run_dir, recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/prepared-skullfix")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=50, help="batch 4: n_train / 4 steps per epoch")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cases", type=int, default=4, help="training cases whose per-sample Tr(H) is measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--signed-lams", default="", help="comma-separated lambdas for FAM trace=signed on the positive-trace loss ('' = none)")
    ap.add_argument("--signed-estimator", default="fd-quarter")
    ap.add_argument("--runs", default="runs/trace-sign", help="scratch folder for the run folders")
    ap.add_argument("--out", default="benchmarks/results/trace_sign_losses.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from skullrec.config import load_config
    from skullrec.data.cache import load_tensor_split

    runs = Path(args.runs)
    e10, e50 = max(1, round(args.epochs * 0.1)), max(1, round(args.epochs * 0.5))
    common = [f"data.root={args.data}", f"data.max_train_cases={args.n_train}", f"train.epochs={args.epochs}",
              f"train.lr={args.lr}", "train.val_every=0", f"train.checkpoint_epochs=[{e10},{e50},{args.epochs}]",
              f"train.num_threads={args.threads}", "seed=0"]
    train = load_tensor_split(args.data, "train", 64, "cpu", max_cases=args.cases)
    x, y = train.defective.float(), train.complete.float()
    steps_per_epoch = math.ceil(args.n_train / 4)
    result: dict = {"args": vars(args), "steps_per_epoch": steps_per_epoch, "losses": {}, "signed": []}
    for loss in ("sigmoid_dice", "softmax_dice"):
        t0 = time.perf_counter()
        ov = common + [f"model.loss={loss}", f"name=baseline-{loss}"]
        cfg = load_config(ROOT / "configs" / "baseline.yaml", ov)
        traces = {"init (step 0)": per_sample_traces(None, cfg, x, y)}
        run_dir, recs = train_run(f"baseline-{loss}", ov, runs)
        for label, epoch in ((f"10 % (step {e10 * steps_per_epoch})", e10), (f"50 % (step {e50 * steps_per_epoch})", e50),
                             (f"end (step {args.epochs * steps_per_epoch})", args.epochs)):
            traces[label] = per_sample_traces(run_dir / f"ckpt_epoch{epoch:03d}.safetensors", cfg, x, y)
        result["losses"][loss] = {
            "per_sample_trace": traces,
            "dice_loss_first": recs[0]["dice_loss"], "dice_loss_last": recs[-1]["dice_loss"],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(loss, json.dumps(result["losses"][loss]), flush=True)

    lams = [float(v) for v in args.signed_lams.split(",") if v.strip()]
    positive = [k for k, v in result["losses"].items() if all(t > 0 for ts in v["per_sample_trace"].values() for t in ts)]
    for loss in positive[:1]:
        for lam in lams:
            ov = common + [f"model.loss={loss}", "train.method=fam", f"fam.lam={lam}", "fam.trace=signed",
                           f"fam.estimator={args.signed_estimator}", f"name=signed-{loss}-{lam}"]
            t0 = time.perf_counter()
            run_dir, recs = train_run(f"signed-{loss}-{lam:g}", ov, runs)
            cfg = load_config(ROOT / "configs" / "baseline.yaml", ov)
            end = per_sample_traces(run_dir / "last.safetensors", cfg, x, y)
            norms = [r["norm_sq"] for r in recs]
            row = {
                "loss": loss, "lam": lam,
                "trace_per_epoch": [r["trace"] for r in recs],
                "norm_sq_per_epoch": norms,
                "dice_loss_per_epoch": [r["dice_loss"] for r in recs],
                "fam_grad_ratio_per_epoch": [r.get("fam_grad_ratio") for r in recs],
                "end_per_sample_trace": end,
                "stable": all(math.isfinite(r["dice_loss"]) for r in recs) and max(norms) < 2 * norms[0]
                and recs[-1]["dice_loss"] < recs[0]["dice_loss"] and min(end) > 0,
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            result["signed"].append(row)
            print("signed", json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
