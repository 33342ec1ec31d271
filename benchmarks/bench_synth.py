"""Procedural skulls vs real SkullFix skulls: generation speed, and shape statistics after the same preparation.

    .venv/bin/python benchmarks/bench_synth.py [--n 100] [--real 10] [--size 64]

1. Times ``generate_skull`` for N skulls on the 64^3 source grid on one thread (CPU seconds and
   wall seconds; the ratio to the 10 s budget for 100 skulls).
2. Prepares synthetic and real complete skulls with ``skullrec.data.resample.prepare_volume`` (same rule,
   same margin) and prints bone fraction (bone voxels / size^3), largest-component share,
   bounding-box extents (mm) and mean thickness (4 * (mean EDT - half a voxel)) at the source grid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from skullrec.data import synth
from skullrec.data.resample import largest_component_fraction, prepare_volume
from skullrec.io import Volume, read_volume

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real-skulls/skullfix-autoimplant2020/raw/training_set/complete_skull"


def stats(vol: Volume, size: int) -> dict[str, float]:
    """Statistics of one complete skull: source extents/thickness and prepared bone fraction/connectivity."""
    data = vol.data.astype(bool)
    sp = np.asarray(vol.spacing)
    idx = [np.flatnonzero(data.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = np.array([i[0] for i in idx])
    hi = np.array([i[-1] for i in idx])
    box = np.pad(data[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1], 1)
    edt = ndimage.distance_transform_edt(box, sampling=sp)
    prepared, _ = prepare_volume(vol, size)
    return {
        "width": (hi[0] - lo[0] + 1) * sp[0],
        "length": (hi[1] - lo[1] + 1) * sp[1],
        "height": (hi[2] - lo[2] + 1) * sp[2],
        "bone_ml": data.sum() * float(np.prod(sp)) / 1000.0,
        "thickness_mm": 4 * (edt[edt > 0].mean() - 0.5 * sp.mean()),
        "bone_fraction_prepared": float(prepared.data.mean()),
        "largest_component_prepared": largest_component_fraction(prepared.data),
    }


def show(name: str, rows: list[dict[str, float]]) -> None:
    print(f"{name} ({len(rows)} skulls): mean [min, max]")
    for k in rows[0]:
        v = np.array([r[k] for r in rows])
        print(f"  {k:28s} {v.mean():8.3f}  [{v.min():.3f}, {v.max():.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--real", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    shape, spacing = synth.source_grid(a.size)
    print(f"source grid {shape} at {spacing[0]} mm")
    synth.generate_skull(0, shape, spacing)  # warm-up
    c0, w0 = time.process_time(), time.perf_counter()
    skulls = [synth.generate_skull(seed, shape, spacing)[0] for seed in range(a.n)]
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    print(f"generate {a.n} skulls: {cpu:.2f} s CPU, {wall:.2f} s wall ({cpu / a.n * 1000:.1f} ms CPU per skull); "
          f"100 skulls would take {cpu / a.n * 100:.1f} s CPU = {cpu / a.n * 100 / 10:.2f}x the 10 s budget")
    aff = synth.source_affine(shape, spacing)
    show("synthetic", [stats(Volume(s.astype(np.uint8), aff), a.size) for s in skulls[: max(10, min(a.n, 30))]])
    if a.real and REAL.is_dir():
        files = sorted(REAL.glob("*.nrrd"))
        pick = files[:: max(1, len(files) // a.real)][: a.real]
        rows = []
        for f in pick:
            rows.append(stats(read_volume(f), a.size))
            print(f"  real {f.name}: fraction {rows[-1]['bone_fraction_prepared']:.3f}", flush=True)
        show("real SkullFix", rows)


if __name__ == "__main__":
    main()
