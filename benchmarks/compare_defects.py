"""Set-1 / set-2 defect statistics on synthetic (and real) skulls, in the fields of measure_skullfix_defects.py.

    .venv/bin/python benchmarks/compare_defects.py [--n 40] [--real 0] [--skullfix benchmarks/results/skullfix_defects.json]

Cuts set-1 and set-2 defects into N procedural skulls (64^3 source grid, 1.5 mm) and, with
--real K, set-1 defects into K SkullFix complete skulls (every second voxel: ~0.9 x 0.9 x 1.3 mm),
and prints min / p5 / median / p95 / max of each field beside the real SkullFix defects.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_skullfix_defects import DEFAULT_ROOT, defect_stats, summarise  # noqa: E402

from skullrec import synth  # noqa: E402
from skullrec.data.defects import set1_defect  # noqa: E402
from skullrec.io import read_volume  # noqa: E402

FIELDS = ("removed_fraction", "implant_volume_ml", "implant_bbox_mm", "implant_pca_extent_mm", "implant_centroid_rel",
          "implant_elevation_deg", "implant_azimuth_deg", "implant_thickness_mm", "skull_extent_mm", "skull_thickness_mm")


def show(name: str, summary: dict) -> None:
    print(f"\n{name}: min, p5, median, p95, max")
    for k in FIELDS:
        if k in summary:
            print(f"  {k}: {summary[k]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--real", type=int, default=0)
    ap.add_argument("--skullfix", type=Path, default=Path("benchmarks/results/skullfix_defects.json"))
    a = ap.parse_args()
    shape, sp = synth.source_grid(64)
    s1, s2, regions = [], [], {}
    for i in range(a.n):
        c, _, cuts = synth.make_case(0, i, shape, sp, sets=(1, 2))
        s1.append(defect_stats(c, cuts[1][0], np.array(sp)))
        s2.append(defect_stats(c, cuts[2][0], np.array(sp), thickness=False))
        key = (cuts[2][1]["region"], cuts[2][1]["shape"])
        regions[key] = regions.get(key, 0) + 1
    if a.skullfix.is_file():
        show("real SkullFix defects (100 training cases)", json.loads(a.skullfix.read_text())["summary (min, p5, median, p95, max)"])
    show(f"set 1 on {a.n} synthetic skulls", summarise(s1))
    show(f"set 2 on {a.n} synthetic skulls", summarise(s2))
    print("set-2 (region, shape) counts:", dict(sorted(regions.items())))
    if a.real:
        rows = []
        for f in sorted((DEFAULT_ROOT / "complete_skull").glob("*.nrrd"))[: a.real]:
            vol = read_volume(f)
            c = vol.data[::2, ::2, ::2].astype(bool)
            spacing = np.array(vol.spacing) * 2
            d, _ = set1_defect(c, spacing, np.random.default_rng(int(f.name[:3])))
            rows.append(defect_stats(c, d, spacing, thickness=False))
            print(f"  {f.name}: removed {rows[-1]['removed_fraction']:.3f} rel {rows[-1]['implant_centroid_rel']}", flush=True)
        show(f"set 1 on {a.real} real SkullFix skulls (2x downsampled)", summarise(rows))


if __name__ == "__main__":
    main()
