"""``skullrec predict`` with the shipped weights (stage 1 + stage 2, no STL) per full-resolution case: today's
box-local implant restriction against the previous whole-volume one, in one process.

    python benchmarks/predict_stage2_speed.py DEFECTIVE_FOLDER [--cases 3] [--threads 2]

Per case (a folder holding a link to that one file), ``predict_folder`` runs twice, the order alternating
from case to case so that a change in the machine's load hits both alike: once as it is, once with
``skullrec.inference.stage2.restrict_in_box`` replaced by the previous computation (paste stage 2's
mask into the whole volume, then ``restrict_implant`` labels all of it, in C order). Prints the seconds
per case of each (checkpoint loading and writing the two .nii.gz included, imports not), their ratio,
whether the complete skull and implant files are identical, and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from skullrec.inference import stage2 as S2
from skullrec.inference.predict import predict_folder
from skullrec.inference.shipped import shipped_checkpoints
from skullrec.io import list_volumes, read_volume


def whole_volume_restriction(mask_box: np.ndarray, box: S2.Box, defective: np.ndarray, stage1_implant: np.ndarray) -> tuple[np.ndarray, int]:
    """The restriction as predict did it before ``restrict_in_box``: on the whole pasted volume."""
    mask = S2.paste(mask_box, box, defective.shape)
    return S2.restrict_implant(mask, defective, stage1_implant), int(mask.sum())


def run(case: Path, out: Path, stage1: Path, stage2: Path, previous: bool) -> float:
    today = S2.restrict_in_box
    S2.restrict_in_box = whole_volume_restriction if previous else today
    try:
        t0 = time.perf_counter()
        predict_folder(stage1, case, out, device="cpu", stage2=stage2)
        return time.perf_counter() - t0
    finally:
        S2.restrict_in_box = today


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="folder of defective skulls (e.g. SkullFix defective_skull/*.nrrd)")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stage1, stage2 = shipped_checkpoints()
    files = list(list_volumes(args.folder).values())[: args.cases]
    work = Path(tempfile.mkdtemp(prefix="predict_stage2_speed_"))
    loads, times = [os.getloadavg()[0]], {"previous": [], "today": []}
    try:
        for i, f in enumerate(files):
            case = work / f"in{i}"
            case.mkdir()
            (case / f.name).symlink_to(f.resolve())
            order = [("previous", True), ("today", False)]
            for name, previous in order if i % 2 == 0 else order[::-1]:
                times[name].append(run(case, work / f"{name}{i}", stage1, stage2, previous))
            same = all(
                np.array_equal(read_volume(next((work / f"previous{i}" / what).iterdir())).data,
                               read_volume(next((work / f"today{i}" / what).iterdir())).data)
                for what in ("complete", "implant")
            )
            shape = " x ".join(map(str, read_volume(f).shape))
            print(f"{f.name}: {shape}, previous {times['previous'][-1]:.2f} s, today {times['today'][-1]:.2f} s, "
                  f"files identical: {'yes' if same else 'NO'}")
            loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p, t = float(np.mean(times["previous"])), float(np.mean(times["today"]))
    print(f"\nmean seconds per case over {len(files)} cases (stage 1 + stage 2, no STL), {args.threads} torch threads, "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    print(f"previous {p:.2f}  today {t:.2f}  today/previous {t / p:.2f}")


if __name__ == "__main__":
    main()
