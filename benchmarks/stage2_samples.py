"""Time stage-2 sample building (`skullrec prepare-implant`'s work) on real SkullFix training skulls.

Writes a manifest holding the first N training ids of the same 80/20 split `skullrec prepare
--eval-fraction 0.2 --seed 0` makes (skullrec.data.build.split_cases), saves an *untrained* default
stage-1 checkpoint (timing only: its reconstruction is not a real prior), and builds the three
samples per skull (SkullFix's defect, set 1 and set 2 cut at the native grid). Prints CPU and wall
seconds and, per sample, the box and how much of the true implant it holds.

    .venv/bin/python benchmarks/stage2_samples.py [--n 1] [--out /tmp/stage2-bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from skullrec.config import config_from_dict
from skullrec.data.build import split_cases
from skullrec.data.layout import write_manifest
from skullrec.inference.samples import build_stage2_data
from skullrec.nets.autoencoder import build_model
from skullrec.nets.checkpoint import save_checkpoint

SKULLFIX = Path(__file__).resolve().parents[1].parent / "shared/data/real-skulls/skullfix-autoimplant2020/raw/training_set"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SKULLFIX)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stage2-bench"))
    args = ap.parse_args()
    ids = sorted(p.name[: -len(".nrrd")] for p in (args.data / "complete_skull").glob("*.nrrd"))
    train, _ = split_cases(ids, 0.2, 0)
    write_manifest(args.out / "prepared", [], {"train_ids": train[: args.n], "complete_folder": str(args.data / "complete_skull"),
                                               "defective_folder": str(args.data / "defective_skull")})
    cfg = config_from_dict({})
    stage1 = save_checkpoint(args.out / "stage1-untrained.safetensors", build_model(cfg.model, seed=0), cfg, epoch=0)
    t0, c0 = time.perf_counter(), time.process_time()
    recs = build_stage2_data(args.out / "prepared", stage1, args.out / "samples", overwrite=True, log=print)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for r in recs:
        print(f"{r['case_id']} {r['kind']:8s} box lo {r['box']['lo']} hi {r['box']['hi']}  implant {r['implant_voxels']} voxels, in box {r['implant_in_box']}")
    print(f"{len(recs)} samples: {cpu:.1f} CPU s ({cpu / len(recs):.1f} per sample), {wall:.1f} s wall")


if __name__ == "__main__":
    main()
