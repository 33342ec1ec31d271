"""The negative-curvature experiment: which Tr(H) shaping should the FAM penalty use?

With Dice loss the layer Hessian's trace is negative at initialisation, so minimising
lam * ||w||^2 * Tr(H) as written rewards making ||w|| large while the curvature stays negative.
This script trains the autoencoder with fam.trace = signed | abs | relu (and a baseline, lam = 0)
through the real trainer (skullrec.cli.train_command) and reports, per run: the trajectory of
Tr(H) and ||w||^2 of decodeL, the final training Dice loss, whether training blew up (non-finite
loss, or ||w||^2 grown more than 100x), and the final validation DSC on both defect sets.

    .venv/bin/python benchmarks/trace_mode_experiment.py                      # CPU-small (minutes)
    .venv/bin/python benchmarks/trace_mode_experiment.py --device cuda --n-train 100 --epochs 40

It synthesises its data set (``skullrec synth``) into --data when that folder is missing.
Results: OUT/results.json and OUT/table.md (one row per run).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(name: str, overrides: list[str], out: Path, device: str) -> dict:
    """Train one configuration with the project's trainer; return its metrics records."""
    from skullrec.cli import train_command

    run_dir = out / name
    t0 = time.perf_counter()
    train_command(config=ROOT / "configs" / "fam.yaml", overrides=overrides, run_dir=run_dir, resume=None,
                  force=False, device=device, overwrite=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"name": name, "overrides": overrides, "records": records, "wall_s": time.perf_counter() - t0}


def summarise(run: dict) -> dict:
    """One table row: trajectories, blow-up flag and final validation DSC."""
    recs = run["records"]
    traces = [r["trace"] if r.get("trace") is not None else r.get("monitor_trace") for r in recs]
    traces = [t for t in traces if t is not None]
    norms = [r["norm_sq"] for r in recs]
    losses = [r["dice_loss"] for r in recs]
    last_val = next((r["val_dsc"] for r in reversed(recs) if r.get("val_dsc")), {})
    blew_up = any(not math.isfinite(v) for v in losses + norms) or (max(norms) > 100 * norms[0])
    return {
        "run": run["name"],
        "trace_first": traces[0] if traces else None,
        "trace_last": traces[-1] if traces else None,
        "trace_min": min(traces) if traces else None,
        "norm_sq_first": norms[0],
        "norm_sq_max": max(norms),
        "norm_sq_last": norms[-1],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "blew_up": blew_up,
        **{f"dsc_{k}": v for k, v in last_val.items()},
        "s_per_epoch": sum(r["seconds"] for r in recs) / len(recs),
    }


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic-trace-exp")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "trace_modes")
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lams", type=str, default="0.002,0.05", help="comma-separated FAM strengths")
    ap.add_argument("--modes", type=str, default="signed,abs,relu")
    ap.add_argument("--gradient", type=str, default="full")
    ap.add_argument("--val-every", type=int, default=0, help="0: validate only after the last epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", type=str, default="cpu")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--results", type=Path, default=None, help="where results.json and table.md go (default: --out)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    a = ap.parse_args()

    if not (a.data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "skullrec", "synth", "--out", str(a.data), "--n-train", str(a.n_train),
                        "--n-eval", str(a.n_eval), "--size", str(a.size), "--seed", "0"], check=True)
    a.out.mkdir(parents=True, exist_ok=True)
    last = a.epochs
    common = [
        f"data.root={a.data}", f"data.max_train_cases={a.n_train}", f"data.max_eval_cases={a.n_eval}",
        f"model.size={a.size}", f"train.epochs={a.epochs}", f"train.batch_size={a.batch_size}", f"train.lr={a.lr}",
        f"train.val_every={a.val_every if a.val_every else a.epochs}", f"train.checkpoint_epochs=[{last}]",
        f"seed={a.seed}", f"fam.gradient={a.gradient}",
        f"train.deterministic={'true' if a.device == 'cpu' else 'false'}",
    ]
    if a.device == "cpu":
        common.append(f"train.num_threads={a.threads}")
    plan = [] if a.no_baseline else [("baseline", ["train.method=baseline", "fam.lam=0"])]
    for lam in a.lams.split(","):
        for mode in a.modes.split(","):
            plan.append((f"fam-{mode}-lam{lam}", ["train.method=fam", f"fam.lam={lam}", f"fam.trace={mode}"]))
    results = a.results or a.out
    results.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    t_start = time.perf_counter()
    for name, ov in plan:
        if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
            print(f"=== time budget spent: skipping {name} and the rest", flush=True)
            break
        print(f"=== {name}", flush=True)
        run = run_one(name, common + ov, a.out, a.device)
        runs.append(run)
        rows.append(summarise(run))
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        (results / "results.json").write_text(json.dumps({"args": args,
                                                        "rows": rows, "runs": runs}, indent=1, default=str))
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    (results / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
