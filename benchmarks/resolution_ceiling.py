"""The resolution ceiling of stage 2: the *true* implant through stage 2's box and grid and back, scored.

Usage: python benchmarks/resolution_ceiling.py --complete DIR --defective DIR [--split validation|eval]
       [--grids 96,128] [--box-mm 128] [--max-cases N] [--out CSV]

For each skull (SkullFix's own defective skull and its complete skull, read at their own 512 x 512 x Z grid):
the true implant (complete AND NOT defective) is cropped into a box of ``--box-mm`` centred on its
centroid, resampled to GRID^3 the way stage 2's input is (:func:`skullrec.inference.stage2.to_grid`) and
back the way stage 2's output is (:func:`~skullrec.inference.stage2.from_grid`, threshold 0.5), pasted,
and cut with AND NOT defective, as predict does. DSC, bDSC and HD95 against the true implant are what a
perfect network at that grid would score: the ceiling set by resampling alone.

The skulls are split as ``skullrec prepare --eval-fraction 0.2 --seed 0`` splits them; ``--split validation``
(default) uses the validation skulls carved from the *training* ids (seed 1, a fifth, as
scripts/make_validation_set.py), so the held-out skulls stay untouched.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from skullrec.data.build import split_cases
from skullrec.data.layout import implant_of
from skullrec.evaluation.metrics import case_metrics
from skullrec.inference.stage2 import box_around, crop, from_grid, paste, to_grid
from skullrec.io import list_volumes, read_volume


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--complete", type=Path, required=True)
    ap.add_argument("--defective", type=Path, required=True)
    ap.add_argument("--split", choices=("validation", "eval"), default="validation")
    ap.add_argument("--grids", default="96,128")
    ap.add_argument("--box-mm", type=float, default=128.0)
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    complete_files, defective_files = list_volumes(args.complete), list_volumes(args.defective)
    train_ids, eval_ids = split_cases(sorted(complete_files), 0.2, 0)
    ids = split_cases(train_ids, 0.2, 1)[1] if args.split == "validation" else eval_ids
    ids = ids[: args.max_cases]
    grids = [int(g) for g in args.grids.split(",")]
    rows = []
    for cid in ids:
        t0 = time.perf_counter()
        complete = read_volume(complete_files[cid])
        defective = read_volume(defective_files[cid])
        truth = implant_of(complete.data, defective.data)
        centre = np.argwhere(truth).mean(axis=0)
        box = box_around(centre, complete.spacing, args.box_mm)
        for grid in grids:
            back = from_grid(to_grid(crop(truth, box).astype(np.float32), grid), box.shape) > 0.5
            pred = paste(back, box, truth.shape) & ~defective.data.astype(bool)
            m = case_metrics(pred, truth, complete.spacing, defective=defective.data, target="implant")
            rows.append({"case": cid, "grid": grid, "voxel_mm": round(args.box_mm / grid, 3), "dsc": m["dsc"], "bdsc": m["bdsc"],
                         "hd95_mm": m["hd95_mm"], "hd_mm": m["hd_mm"], "outside_box_voxels": int(truth.sum() - crop(truth, box).sum())})
            print(f"{cid} grid {grid}: dsc {m['dsc']:.4f} bdsc {m['bdsc']:.4f} hd95 {m['hd95_mm']:.2f} mm "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{args.split} skulls: {len(ids)} ({', '.join(ids)}); box {args.box_mm:g} mm")
    print("| grid | voxel mm | DSC mean (min) | bDSC mean | HD95 mm mean (max) |")
    print("|---|---|---|---|---|")
    for grid in grids:
        g = [r for r in rows if r["grid"] == grid]
        d, b, h = (np.array([r[k] for r in g]) for k in ("dsc", "bdsc", "hd95_mm"))
        print(f"| {grid}³ | {args.box_mm / grid:.2f} | {d.mean():.4f} ({d.min():.4f}) | {b.mean():.4f} | {h.mean():.2f} ({h.max():.2f}) |")
    if args.out is not None:
        with args.out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
