"""CT -> implant end to end on a SkullFix case: a CT-like DICOM series made from the defective skull, then
``skullrec predict --ct`` with the shipped weights; scores the CT mask against the skull and the implant
against the case's ground-truth implant.

    python benchmarks/ct_dicom_skullfix.py [CASE] [OUT]      (default 000, /tmp/skullrec_ct_dicom)

SkullFix is distributed as masks, not CTs: the HU values (bone 700-1800, soft tissue 0-80 inside and
around the skull, air -1000, noise SD 20 HU) are synthetic (tests/ct_helpers.py), so this checks the
reading, the mask and the grid of the outputs, not the behaviour on a real scanner's images.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import SKULLFIX_TRAINING  # noqa: E402
from ct_helpers import ct_from_skull, write_dicom_series  # noqa: E402


def main(case: str = "000", out: str = "/tmp/skullrec_ct_dicom") -> None:
    from skullrec.cli import predict_command
    from skullrec.data.ct import read_ct_skull
    from skullrec.io import read_volume, to_canonical

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    img = sitk.ReadImage(str(SKULLFIX_TRAINING / "defective_skull" / f"{case}.nrrd"))
    defective = sitk.GetArrayFromImage(img).transpose(2, 1, 0) > 0
    t0 = time.perf_counter()
    hu = ct_from_skull(defective, np.random.default_rng(0))
    # SkullFix's NRRD direction is identity (LPS): the same grid as a DICOM series with identity orientation.
    spacing, origin = img.GetSpacing(), img.GetOrigin()
    write_dicom_series(out / "in" / case, hu, spacing, np.asarray(img.GetDirection()).reshape(3, 3), origin,
                       slope=1, intercept=-1024)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask, info = read_ct_skull(out / "in" / case)
    t_mask = time.perf_counter() - t0
    want = to_canonical(defective.astype(np.uint8), mask.source.affine)[0].astype(bool)
    m = mask.data.astype(bool)
    dice_mask = 2 * (m & want).sum() / (m.sum() + want.sum())
    t0 = time.perf_counter()
    predict_command(checkpoint=None, inp=out / "in", out=out / "pred", ct=True, device="cpu")
    t_pred = time.perf_counter() - t0
    truth = read_volume(SKULLFIX_TRAINING / "implant" / f"{case}.nrrd")
    pred = read_volume(out / "pred" / "implant" / f"{case}.nii.gz")
    assert pred.shape == truth.shape and np.allclose(pred.affine, truth.affine, atol=1e-4)
    p, t = pred.data.astype(bool), truth.data.astype(bool)
    dice_implant = 2 * (p & t).sum() / (p.sum() + t.sum())
    row = {"case": case, "shape": list(mask.shape), "slices": len(list((out / "in" / case).iterdir())),
           "mask_dice_vs_skull": round(float(dice_mask), 5), "mask_info": info,
           "implant_dice_vs_truth": round(float(dice_implant), 4),
           "seconds": {"make_and_write_dicom": round(t_write, 1), "read_and_mask": round(t_mask, 1), "predict": round(t_pred, 1)}}
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
