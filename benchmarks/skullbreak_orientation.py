"""Which voxel order does the SkullBreak sample (NIfTI, qform/sform codes 0: no orientation) use?

Prepares it at 32^3 in each of the 48 axis orders / flips and prints the mean DSC of each against
the first SkullFix defective skulls (prepared the same way), best first, marking the order as
stored (what skullrec reads for a file without orientation) and with axis 1 reversed (nibabel's
fallback affine, L, A, S). A head in the right order overlaps real heads best. Needs ../shared.

    python benchmarks/skullbreak_orientation.py [--n 4]
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import numpy as np

from skullrec.data.resample import prepare_volume
from skullrec.io import Volume, read_volume

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-skulls"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="SkullFix cases to compare with")
    args = parser.parse_args()
    logging.getLogger("skullrec").setLevel(logging.ERROR)  # the "no orientation" warning is expected here
    sb = read_volume(REAL / "skullbreak-sample-biodatlab" / "skullbreak_parietotemporal_001.nii.gz")
    files = sorted((REAL / "skullfix-autoimplant2020" / "raw" / "training_set" / "defective_skull").glob("*.nrrd"))[: args.n]
    real = [prepare_volume(read_volume(f), 32)[0].data.astype(bool) for f in files]
    rows = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            d = np.transpose(sb.data, perm)
            for axis, flip in enumerate(flips):
                if flip:
                    d = np.flip(d, axis=axis)
            p = prepare_volume(Volume(np.ascontiguousarray(d), sb.affine), 32)[0].data.astype(bool)
            rows.append((float(np.mean([2 * (x & p).sum() / (x.sum() + p.sum()) for x in real])), perm, flips))
    rows.sort(reverse=True)
    names = {((0, 1, 2), (False, False, False)): "  <- as stored", ((0, 1, 2), (False, True, False)): "  <- axis 1 reversed (nibabel's L, A, S)"}
    print(f"mean DSC against SkullFix {', '.join(f.stem for f in files)} at 32^3, all 48 orders:")
    for rank, (dsc, perm, flips) in enumerate(rows, 1):
        mark = names.get((perm, flips), "")
        if rank <= 5 or mark:
            print(f"{rank:2d}. {dsc:.3f}  axes {perm} flips {tuple(int(f) for f in flips)}{mark}")

if __name__ == "__main__":
    main()
