"""Measure the real SkullFix training defects (implant = complete AND NOT defective).

What set-1 defects in skullrec.data.defects are matched against: implant voxel counts, removed fraction
of bone, implant extents in mm (axis-aligned bounding box and principal axes), centroid position
relative to the skull's bounding box, the implant's direction from the skull centre, plus skull
size and bone fraction (for skullrec.data.synth).

    .venv/bin/python benchmarks/measure_skullfix_defects.py [--root DIR] [--jobs 2] [--out FILE.json]

Reads 2 x 100 gzip NRRDs of 512x512xZ: a few minutes with 2 processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from scipy import ndimage

from skullrec.io import read_volume

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/real-skulls/skullfix-autoimplant2020/raw/training_set"


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return np.array([i[0] for i in idx]), np.array([i[-1] for i in idx])


THICKNESS = True


def measure(args: tuple[Path, Path]) -> dict:
    """All numbers for one SkullFix case (complete file, defective file)."""
    cpath, dpath = args
    c = read_volume(cpath).data.astype(bool)
    d = read_volume(dpath)
    sp = np.array(d.spacing)
    rec = {"case": cpath.name.split(".")[0], "shape": list(c.shape), "spacing": [round(float(s), 4) for s in sp]}
    rec.update(defect_stats(c, d.data.astype(bool), sp, thickness=THICKNESS))
    return rec


def defect_stats(c: np.ndarray, d: np.ndarray, sp: np.ndarray, thickness: bool = True) -> dict:
    """Skull and defect statistics of a complete / defective pair (bool arrays) on a grid of spacing ``sp`` mm."""
    sp = np.asarray(sp, dtype=np.float64)
    implant = c & ~d
    lo, hi = _bbox(c)
    skull_ext = (hi - lo + 1) * sp
    bone = int(c.sum())
    rec: dict = {
        "bone_voxels": bone,
        "skull_extent_mm": [round(float(e), 1) for e in skull_ext],
        # physical bone volume over the bbox volume (spacing-free); with a 4 mm margin on all sides too
        "bone_fraction_bbox": bone / float(np.prod(hi - lo + 1)),
        "bone_fraction_bbox_4mm": bone * float(np.prod(sp)) / float(np.prod(skull_ext + 8.0)),
        "defect_outside_complete": int((d & ~c).sum()),
    }
    n = int(implant.sum())
    rec["implant_voxels"] = n
    rec["removed_fraction"] = n / bone
    rec["implant_volume_ml"] = n * float(np.prod(sp)) / 1000.0
    if n:
        ilo, ihi = _bbox(implant)
        sub = implant[ilo[0] : ihi[0] + 1, ilo[1] : ihi[1] + 1, ilo[2] : ihi[2] + 1]
        _, ncomp = ndimage.label(sub, structure=np.ones((3, 3, 3)))
        pts = (np.argwhere(sub) + ilo) * sp
        cen = pts.mean(axis=0)
        rec["implant_components_26"] = int(ncomp)
        rec["implant_bbox_mm"] = [round(float(e), 1) for e in (ihi - ilo + 1) * sp]
        rec["implant_centroid_rel"] = [round(float(v), 3) for v in (cen / sp - lo) / (hi - lo)]
        # principal axes: sqrt(12)*std is the full length of a uniform box along that axis
        w, v = np.linalg.eigh(np.cov((pts - cen).T))
        rec["implant_pca_extent_mm"] = [round(float(np.sqrt(12 * max(x, 0))), 1) for x in w[::-1]]
        normal = v[:, 0]  # smallest extent = through the bone
        rec["implant_normal_tilt_deg"] = round(float(np.degrees(np.arccos(abs(normal[2])))), 1)
        skull_c = (lo + hi) / 2 * sp
        dirv = cen - skull_c
        dirv /= np.linalg.norm(dirv)
        rec["implant_elevation_deg"] = round(float(np.degrees(np.arcsin(dirv[2]))), 1)
        rec["implant_azimuth_deg"] = round(float(np.degrees(np.arctan2(dirv[1], dirv[0]))), 1)
        # local vault thickness where the defect is: bone run length along z in the columns under it
        cols = implant.any(axis=2)
        runs = implant[cols].sum(axis=1) * sp[2]
        rec["implant_z_run_mm_median"] = round(float(np.median(runs)), 1)
        # bone thickness under the defect: for a slab of thickness t the distance from a voxel
        # centre to the surface, minus half a voxel, averages t/4
        edt = ndimage.distance_transform_edt(np.pad(sub, 1), sampling=sp)
        rec["implant_thickness_mm"] = round(float(4 * (edt[edt > 0].mean() - 0.5 * sp.mean())), 2)
    if thickness:
        box = np.pad(c[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1], 1)
        edt = ndimage.distance_transform_edt(box, sampling=sp)
        rec["skull_thickness_mm"] = round(float(4 * (edt[edt > 0].mean() - 0.5 * sp.mean())), 2)
    return rec


def summarise(records: list[dict]) -> dict:
    """min / 5 % / median / 95 % / max of every numeric field (per component for lists)."""
    out: dict = {}
    keys = [k for k in records[0] if k not in ("case", "shape", "spacing")]
    for k in keys:
        vals = np.array([r[k] for r in records if k in r], dtype=float)
        q = np.percentile(vals, [0, 5, 50, 95, 100], axis=0)
        out[k] = np.round(q, 4).T.tolist() if vals.ndim == 2 else np.round(q, 4).tolist()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/skullfix_defects.json"))
    a = ap.parse_args()
    if not (a.root / "complete_skull").is_dir():
        print(f"no SkullFix data under {a.root}", file=sys.stderr)
        return 1
    cases = sorted((a.root / "complete_skull").glob("*.nrrd"))[: a.max_cases]
    pairs = [(p, a.root / "defective_skull" / p.name) for p in cases]
    t0 = time.perf_counter()
    records = []
    with Pool(min(a.jobs, 2)) as pool:  # the machine is shared: 2 processes at most
        for i, rec in enumerate(pool.imap(measure, pairs), 1):
            records.append(rec)
            print(
                f"[{i}/{len(pairs)}] {rec['case']} removed {rec['removed_fraction']:.3f} "
                f"bbox {rec.get('implant_bbox_mm')} rel {rec.get('implant_centroid_rel')} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    summary = summarise(records)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary (min, p5, median, p95, max)": summary, "cases": records}, indent=1) + "\n")
    print("\nfield: min, p5, median, p95, max")
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
