"""Which downsampling rule keeps a real skull in one piece at 64^3? Measured on SkullFix.

For every complete skull in SkullFix's training set (000-099) this prepares the skull on the
grid that ``skullrec prepare`` uses (crop box from the DEFECTIVE skull + margin, resampled to
``--size``^3) with several rules and prints, per rule, the largest-connected-component fraction
(min / median over cases, 6- and 26-connectivity), the number of pieces and the bone fraction.
It also measures how much complete-skull bone falls outside the defective-based box for a few
margins (the defect may remove the top of the vault, so the box could clip the complete skull).

Usage (2 processes at most on the shared 2-core machine; about 5 minutes for 100 cases)::

    .venv/bin/python benchmarks/prepare_connectivity.py [--root DIR] [--size 64] [--margin-mm 4] [--jobs 2] [--max-cases N]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-skulls" / "skullfix-autoimplant2020" / "raw" / "training_set"
RULES = ["nearest", "frac>0 (any bone)", "frac>0.1", "frac>0.15", "frac>0.2", "frac>0.25", "frac>0.3", "frac>=0.5"]
CLIP_MARGINS = [0.0, 2.0, 4.0, 8.0]


def _nearest(vol, box, size: int) -> np.ndarray:
    """Nearest-neighbour sampling of the source at each prepared voxel centre (outside = background)."""
    idx = []
    for lo, hi, dim in zip(box.lo, box.hi, vol.shape):
        step = (hi - lo) / size
        centre = lo - 0.5 + (np.arange(size) + 0.5) * step
        idx.append(np.floor(centre + 0.5).astype(int))
    valid = [(i >= 0) & (i < d) for i, d in zip(idx, vol.shape)]
    out = np.zeros((size,) * 3, dtype=bool)
    sub = vol.data[np.ix_(*(np.clip(i, 0, d - 1) for i, d in zip(idx, vol.shape)))] > 0
    out[np.ix_(*valid)] = sub[np.ix_(*valid)]
    return out


def measure(args: tuple[str, str, int, float]) -> dict:
    complete_path, defective_path, size, margin_mm = args
    from scipy import ndimage

    from skullrec.data import resample as P
    from skullrec.io import read_volume

    complete = read_volume(complete_path)
    defective = read_volume(defective_path)
    box = P.bone_box(defective, margin_mm)
    frac = P.bone_fraction(complete, box, size)
    masks = {
        "nearest": _nearest(complete, box, size),
        "frac>0 (any bone)": frac > 1e-6,  # float32 round-off leaves ~1e-8 where there is no bone
        "frac>0.1": frac > 0.1,
        "frac>0.15": frac > 0.15,
        "frac>0.2": frac > 0.2,
        "frac>0.25": frac > 0.25,
        "frac>0.3": frac > 0.3,
        "frac>=0.5": frac >= 0.5,
    }
    row: dict = {"case": Path(complete_path).stem, "spacing": complete.spacing, "shape": complete.shape}
    # The source skull itself (one labelling of ~60-130 M voxels, 26-connectivity only, to keep this affordable).
    labels, n26 = ndimage.label(complete.data, structure=ndimage.generate_binary_structure(3, 3))
    counts = np.bincount(labels.ravel())[1:]
    del labels
    row["source"] = (float("nan"), float(counts.max() / counts.sum()), -1, n26,
                     float(frac.mean()))  # true bone fraction of the box (partial-volume mean)
    for rule, m in masks.items():
        row[rule] = (
            P.largest_component_fraction(m, 1),
            P.largest_component_fraction(m, 3),
            ndimage.label(m, structure=ndimage.generate_binary_structure(3, 1))[1],
            ndimage.label(m, structure=ndimage.generate_binary_structure(3, 3))[1],
            float(m.mean()),
        )
    # Complete-skull bone outside the defective-based box, per margin.
    total = int(complete.data.sum())
    for margin in CLIP_MARGINS:
        b = P.bone_box(defective, margin)
        inside = complete.data[tuple(slice(max(l, 0), h) for l, h in zip(b.lo, b.hi))].sum()
        row[f"clip@{margin:g}"] = (total - int(inside)) / total
    # The physical size of the box (mm), for the README's "what a 64^3 voxel is".
    row["box_mm"] = tuple(float(n * s) for n, s in zip(box.shape, complete.spacing))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--margin-mm", type=float, default=4.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--max-cases", type=int, default=None)
    a = ap.parse_args()
    if not a.root.is_dir():
        raise SystemExit(f"{a.root}: SkullFix training set not found")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ids = sorted(p.name[:-5] for p in (a.root / "complete_skull").glob("*.nrrd"))
    ids = [i for i in ids if (a.root / "defective_skull" / f"{i}.nrrd").is_file()][: a.max_cases]
    jobs = [(str(a.root / "complete_skull" / f"{i}.nrrd"), str(a.root / "defective_skull" / f"{i}.nrrd"), a.size, a.margin_mm) for i in ids]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(a.jobs, 2)) as pool:
        rows = list(pool.map(measure, jobs))
    print(f"{len(rows)} SkullFix complete skulls, size {a.size}^3, box from the defective skull + {a.margin_mm:g} mm, {time.time() - t0:.0f} s")
    print("LCC = fraction of bone voxels in the largest connected component (6- or 26-connectivity); pieces = components")
    print(f"{'rule':<20} {'LCC6 min':>9} {'LCC6 med':>9} {'LCC26 min':>9} {'LCC26 med':>9} {'pieces6 med/max':>15} {'pieces26 med/max':>16} {'LCC6>=99%':>9} {'bone frac med (min-max)':>24}")
    for rule in ["source"] + RULES:
        lcc6 = np.array([r[rule][0] for r in rows])
        lcc26 = np.array([r[rule][1] for r in rows])
        p6 = np.array([r[rule][2] for r in rows])
        p26 = np.array([r[rule][3] for r in rows])
        bf = np.array([r[rule][4] for r in rows])
        name = "source (full res)*" if rule == "source" else rule
        if rule == "source":
            print(f"{name:<20} {'-':>9} {'-':>9} {lcc26.min():9.4f} {np.median(lcc26):9.4f} {'-':>15} {np.median(p26):9.0f}/{p26.max():<6d} {'-':>9} "
                  f"{np.median(bf):10.4f} ({bf.min():.4f}-{bf.max():.4f})")
            continue
        print(
            f"{name:<20} {lcc6.min():9.4f} {np.median(lcc6):9.4f} {lcc26.min():9.4f} {np.median(lcc26):9.4f} "
            f"{np.median(p6):8.0f}/{p6.max():<6d} {np.median(p26):9.0f}/{p26.max():<6d} {int((lcc6 >= 0.99).sum()):>5d}/{len(rows):<3d} "
            f"{np.median(bf):10.4f} ({bf.min():.4f}-{bf.max():.4f})"
        )
    print("* source: 26-connectivity at full resolution; its bone fraction is the exact partial-volume mean over the box")
    print("complete-skull bone outside the defective-based box (fraction of its bone voxels):")
    for margin in CLIP_MARGINS:
        c = np.array([r[f"clip@{margin:g}"] for r in rows])
        print(f"  margin {margin:4.1f} mm: max {c.max():.2e}, mean {c.mean():.2e}, cases clipped {int((c > 0).sum())}/{len(rows)}")
    box = np.array([r["box_mm"] for r in rows])
    print(f"box size (mm) median {np.median(box, axis=0).round(1).tolist()}, min {box.min(axis=0).round(1).tolist()}, max {box.max(axis=0).round(1).tolist()}")
    vox = box / a.size
    print(f"prepared voxel size (mm) median {np.median(vox, axis=0).round(2).tolist()}, min {vox.min(axis=0).round(2).tolist()}, max {vox.max(axis=0).round(2).tolist()}")
    worst = sorted(rows, key=lambda r: r["frac>0.25"][0])[:3]
    print("worst cases for frac>0.25 (LCC6):", ", ".join(f"{r['case']} {r['frac>0.25'][0]:.4f}" for r in worst))


if __name__ == "__main__":
    main()
