"""Full-resolution scoring: the fast case_metrics (box crop, shared-surface skip, pruned bDSC search,
counted Dice) against the full-volume computation it replaced, on real 512 x 512 x Z SkullFix cases.

Two scenarios per case, both with the defective skull given (so bDSC is computed too):
  skull    the defective skull scored as a "reconstruction" of the complete skull (--target skull);
  implant  a predicted implant = the true implant shifted by (3, -2, 2) voxels plus a one-voxel false
           sheet over half of the defective skull's outer surface (what a coarse stage-1 implant
           looks like: pieces all around the skull), against the true implant (--target implant).
Prints CPU seconds (process time, all threads; wall time beside it, which on the shared
development machine depends on the load)
of both implementations, their ratio, that the values agree, and the projected CPU time of
`skullrec evaluate` on 20 cases (reading three NRRD files + the fast metrics per case).

    .venv/bin/python benchmarks/evaluate_fullres.py [--cases 000 001 002] [--skip-old]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from skullrec.evaluation.metrics import case_metrics
from skullrec.io import read_volume

SKULLFIX = Path(__file__).resolve().parents[1].parent / "shared/data/real-skulls/skullfix-autoimplant2020/raw/training_set"
KEYS = ("dsc", "bdsc", "hd_mm", "hd95_mm", "hd_vox", "hd95_vox")


def cpu(fn):
    """(result, CPU seconds of this process: every thread, so the KD-tree's parallel queries count in full)."""
    t0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    WALL.append(time.perf_counter() - w0)
    return out, time.process_time() - t0


WALL: list[float] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SKULLFIX)
    ap.add_argument("--cases", nargs="+", default=["000", "001", "002"])
    ap.add_argument("--skip-old", action="store_true", help="time only the fast path")
    args = ap.parse_args()
    totals = {"read": 0.0, "new": 0.0, "old": 0.0}
    n_scored = 0
    for cid in args.cases:
        (c, d), t_read = cpu(lambda: (read_volume(args.data / "complete_skull" / f"{cid}.nrrd"),
                                      read_volume(args.data / "defective_skull" / f"{cid}.nrrd")))
        totals["read"] += t_read * 1.5  # evaluate reads three files (pred, truth, defective)
        comp, defe = c.data.astype(bool), d.data.astype(bool)
        implant = comp & ~defe
        half = np.zeros(comp.shape, bool)
        half[comp.shape[0] // 2 :] = True
        sheet = ndimage.binary_dilation(defe) & ~defe & half
        pred_implant = np.roll(implant, (3, -2, 2), axis=(0, 1, 2)) | sheet
        for name, (p, t, target) in {"skull": (defe, comp, "skull"), "implant": (pred_implant, implant, "implant")}.items():
            new, t_new = cpu(lambda: case_metrics(p, t, c.spacing, defective=defe, target=target))
            line = f"{cid} {name:7s} {c.shape} new {t_new:6.2f} s (wall {WALL[-1]:5.2f} s)"
            totals["new"] += t_new
            if not args.skip_old:
                old, t_old = cpu(lambda: case_metrics(p, t, c.spacing, defective=defe, target=target, full_volume=True))
                totals["old"] += t_old
                same = all(new[k] == old[k] if k in ("dsc", "bdsc") else abs(new[k] - old[k]) <= 1e-6 * max(1.0, abs(old[k])) for k in KEYS)
                line += f"  old {t_old:6.2f} s (wall {WALL[-1]:5.2f} s)  old/new {t_old / t_new:5.2f}  values equal: {same}"
            print(line + "  " + " ".join(f"{k}={new[k]:.4f}" for k in KEYS), flush=True)
            n_scored += 1
    n = len(args.cases)
    print(f"CPU per scored case: new {totals['new'] / n_scored:.2f} s" + ("" if args.skip_old else f", old {totals['old'] / n_scored:.2f} s, old/new {totals['old'] / totals['new']:.2f}"))
    per_case = totals["read"] / n + totals["new"] / n_scored
    print(f"projected `skullrec evaluate` on 20 cases (read 3 NRRD + fast metrics): {20 * per_case:.0f} CPU s (target 120 s)")


if __name__ == "__main__":
    main()
