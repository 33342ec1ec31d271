"""Full-resolution ``skullrec predict`` (stage 1, no STL): the previous path against today's, per stage, in one process.

    python benchmarks/predict_speed.py CHECKPOINT DEFECTIVE_FOLDER [--cases 3] [--threads 2]

Per case, both paths run back to back (their order alternating from case to case, so a change in the
machine's load hits both alike) and each stage is timed:

- read: ``read_volume``; the previous path also made the C-ordered copy the earlier reader made
  (it is missing the earlier full copy out of SimpleITK and its slower binary check, so the previous
  figure is, if anything, too low);
- prepare + forward: crop/downsample to ``size^3`` and the model (the same code, a C- or Fortran-ordered input);
- finish: back to the input grid and the implant (``finish_reference`` against ``_finish``);
- write: complete + implant as .nii.gz (C-ordered arrays, the previous layout, against Fortran-ordered ones).

It checks that both paths give the same complete skull and implant, and prints old/new seconds, the
ratio and the load average (``os.getloadavg``) beside them. The new path's ``end-to-end`` row is
``predict_folder`` itself on the same cases (checkpoint loading included).
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

from skullrec.data.resample import prepare_volume
from skullrec.inference.predict import _finish, finish_reference, predict_folder
from skullrec.io import Volume, list_volumes, read_volume, write_nifti, write_volume
from skullrec.nets.autoencoder import bone_logit
from skullrec.nets.checkpoint import load_checkpoint

STAGES = ("read", "prepare+forward", "finish", "write", "total")


def _prob(model: torch.nn.Module, vol: Volume, size: int) -> tuple[Volume, np.ndarray]:
    prepared = prepare_volume(vol, size)[0]
    with torch.inference_mode():
        logits = bone_logit(model(torch.from_numpy(prepared.data.astype(np.float32)[None, None]))).float()
    return prepared, torch.sigmoid(logits).numpy()[0, 0]


def old_path(path: Path, model: torch.nn.Module, size: int, out: Path) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    t = {}
    t0 = time.perf_counter()
    vol = read_volume(path)
    vol = Volume(np.ascontiguousarray(vol.data), vol.affine, vol.header, vol.path, vol.source)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared, prob = _prob(model, vol, size)
    t["prepare+forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    complete, implant, _ = finish_reference(vol, prepared, prob)
    complete, implant = complete.astype(np.uint8), implant.astype(np.uint8)
    t["finish"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, arr in (("complete", complete), ("implant", implant)):
        write_nifti(out / f"old_{name}.nii.gz", arr, vol.affine, vol.header)  # SkullFix files are canonical: no reorientation
    t["write"] = time.perf_counter() - t0
    return t, complete, implant


def new_path(path: Path, model: torch.nn.Module, size: int, out: Path) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    t = {}
    t0 = time.perf_counter()
    vol = read_volume(path)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared, prob = _prob(model, vol, size)
    t["prepare+forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = _finish(vol, prepared, prob, 0.5, 100.0)
    t["finish"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_volume(out / "new_complete.nii.gz", rec.complete)
    write_volume(out / "new_implant.nii.gz", rec.implant)
    t["write"] = time.perf_counter() - t0
    return t, rec.complete.data, rec.implant.data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("folder", type=Path, help="folder of defective skulls (e.g. SkullFix defective_skull/*.nrrd)")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg, _ = load_checkpoint(args.checkpoint, torch.device("cpu"))
    model.eval()
    files = list(list_volumes(args.folder).values())[: args.cases]
    work = Path(tempfile.mkdtemp(prefix="predict_speed_"))
    rows = {"old": {s: [] for s in STAGES}, "new": {s: [] for s in STAGES}}
    loads = [os.getloadavg()[0]]
    try:
        for i, f in enumerate(files):
            order = [("old", old_path), ("new", new_path)]
            outputs = {}
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t, complete, implant = fn(f, model, cfg.model.size, work)
                t["total"] = sum(t.values())
                for s in STAGES:
                    rows[name][s].append(t[s])
                outputs[name] = (complete, implant)
            same = all(np.array_equal(a, b) for a, b in zip(outputs["old"], outputs["new"]))
            shape = " x ".join(map(str, outputs["new"][0].shape))
            print(f"{f.name}: {shape}, old {rows['old']['total'][-1]:.2f} s, new {rows['new']['total'][-1]:.2f} s, "
                  f"outputs equal: {'yes' if same else 'NO'}, implant voxels {int(outputs['new'][1].sum())}")
            loads.append(os.getloadavg()[0])
        # The real command on the same cases (one folder of links), checkpoint loading included.
        inp = work / "in"
        inp.mkdir()
        for f in files:
            (inp / f.name).symlink_to(f.resolve())
        t0 = time.perf_counter()
        predict_folder(args.checkpoint, inp, work / "out", device="cpu")
        end_to_end = (time.perf_counter() - t0) / len(files)
        loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmean seconds per case over {len(files)} cases, {args.threads} torch threads, "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<16} {'old':>7} {'new':>7} {'new/old':>8}")
    for s in STAGES:
        o, n = float(np.mean(rows["old"][s])), float(np.mean(rows["new"][s]))
        print(f"{s:<16} {o:7.2f} {n:7.2f} {n / o:8.2f}")
    print(f"{'end-to-end new':<16} {'':>7} {end_to_end:7.2f}   (skullrec predict's predict_folder, per case)")


if __name__ == "__main__":
    main()
