"""Seed-paired differences to the baseline with a seed x case bootstrap interval, TOST and the smallest detectable effect.

Usage: python scripts/equivalence.py PER_CASE.csv [--baseline baseline] [--exclude 052] [--margin 0.01]
       [--epoch 200] [--metrics skull:dsc,implant:dsc,implant:bdsc] [--out FILE.md]

Reads the per-case rows an experiment writes (per_case.csv) and prints, for every arm that is not a
reference row, set and metric: the mean difference, its 95 % seed x case bootstrap interval, the TOST
verdict against +/- margin (on per-case differences averaged over seeds, and on the bootstrap's 90 %
interval), and the smallest difference the design detects with 80 % power.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from skullrec.experiment.report import paired_differences
from skullrec.experiment.stats import bootstrap_equivalence, min_detectable_effect, seed_case_bootstrap, tost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("per_case", type=Path)
    ap.add_argument("--baseline", default="baseline")
    ap.add_argument("--exclude", default="052", help="comma-separated case ids to leave out ('' for none)")
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--epoch", type=int, default=200)
    ap.add_argument("--metrics", default="skull:dsc,implant:dsc,implant:bdsc")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    rows = list(csv.DictReader(args.per_case.open()))
    exclude = {c.strip() for c in args.exclude.split(",") if c.strip()}
    arms = sorted({r["method"] for r in rows if not r["method"].startswith("ref:") and r["method"] != args.baseline})
    splits = sorted({r["set"] for r in rows})
    metrics = [tuple(m.split(":")) for m in args.metrics.split(",")]
    lines = [
        f"Differences arm - {args.baseline} at epoch {args.epoch}, paired by seed and case; cases left out: "
        f"{', '.join(sorted(exclude)) or 'none'}. Equivalence margin +/- {args.margin:g}.",
        "",
        "| arm | set | target:metric | seeds x cases | mean diff | 95 % seed x case bootstrap | TOST p (case-level) | "
        "equivalent (t / bootstrap 90 %) | 80 %-power detectable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for split in splits:
            for target, metric in metrics:
                d, seeds, cases = paired_differences(rows, arm, args.baseline, target=target, split=split, epoch=args.epoch,
                                                     metric=metric, exclude=exclude)
                if d.size == 0 or len(cases) < 2:
                    continue
                iv = seed_case_bootstrap(d)
                t = tost(d.mean(axis=0), args.margin)
                ok_boot, _ = bootstrap_equivalence(d, args.margin)
                mde = min_detectable_effect(float(d.mean(axis=0).std(ddof=1)), len(cases))
                lines.append(
                    f"| {arm} | {split} | {target}:{metric} | {len(seeds)} x {len(cases)} | {iv.mean:+.4f} | "
                    f"[{iv.lo:+.4f}, {iv.hi:+.4f}] | {t.p:.3g} | {'yes' if t.equivalent else 'no'} / "
                    f"{'yes' if ok_boot else 'no'} | {mde:.4f} |"
                )
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
