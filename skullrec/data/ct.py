"""CT in Hounsfield units -> binary skull mask, the input skullrec's models take.

Clinicians start from a CT scan (a DICOM series or a NIfTI/NRRD volume in HU), not from a skull
mask. :func:`skull_mask_from_ct` makes the mask: bone is ``HU >= bone_hu`` (300 HU by default:
cortical bone is ~700-1800 HU, soft tissue and brain 0-80 HU, fat about -100, air -1000), of
which the largest 26-connected component is kept, so noise specks, the head holder, the jaw and
the spine (all separate pieces at this threshold) go. Nothing is filled or closed: the
craniectomy must stay open, since an implant is designed for the hole, and a mask whose hole was
bridged by hole filling or a morphological closing would give an empty implant.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io import Volume, read_volume

# HU threshold of bone. Cortical skull bone is ~700-1800 HU; 300 HU sits well above soft tissue,
# blood and contrast-free brain (< 100 HU) and below thin, partial-volumed bone (orbit roof,
# temporal squama), so the skull stays one piece.
DEFAULT_BONE_HU = 300.0
# Warn when more than this share of the above-threshold voxels lies outside the kept piece: the
# scan may hold much other bone (jaw, spine), or a thin skull fell apart at this threshold.
DROPPED_WARN_FRACTION = 0.2


def skull_mask_from_ct(hu: np.ndarray, bone_hu: float = DEFAULT_BONE_HU, *, source: str | Path = "<array>") -> tuple[np.ndarray, dict[str, Any]]:
    """The skull of a CT in HU as a uint8 {0, 1} mask (same shape), and what was done as a dict.

    Threshold ``hu >= bone_hu``, then keep the largest 26-connected component (every other
    component, big or small, is removed). No hole filling or closing, so a defect stays open.

    Raises:
        InputError: no voxel reaches ``bone_hu``, or the volume looks like a binary mask, not a CT.
    """
    hu = np.asarray(hu)
    if hu.size and np.issubdtype(hu.dtype, np.number):
        lo, hi = float(np.min(hu)), float(np.max(hu))
        if lo >= 0 and hi <= 1:  # a mask given with --ct: thresholding it at 300 HU would find nothing
            raise InputError(f"{source}: values {lo:g} to {hi:g} look like a binary mask, not a CT in HU; leave out --ct")
        if hi < bone_hu:
            raise InputError(f"{source}: no voxel reaches the bone threshold of {bone_hu:g} HU (values {lo:g} to {hi:g}); "
                             "is it a CT in HU? (--bone-hu sets the threshold)")
    bone = hu >= bone_hu
    labels, n = ndimage.label(bone, structure=np.ones((3, 3, 3), dtype=bool))
    # Sizes counted over the bone voxels only (a bincount of the whole label array is a big int64 copy).
    if n == 0:
        raise InputError(f"{source}: no voxel reaches the bone threshold of {bone_hu:g} HU")
    sizes = np.bincount(labels[bone], minlength=n + 1)
    keep = int(np.argmax(sizes[1:])) + 1
    mask = (labels == keep).view(np.uint8)
    total = int(sizes[1:].sum())
    info = {
        "bone_hu": float(bone_hu),
        "bone_voxels_above_threshold": total,
        "components": int(n),
        "kept_voxels": int(sizes[keep]),
        "dropped_fraction": round(1.0 - float(sizes[keep]) / total, 4),
    }
    return mask, info


def mask_warnings(info: dict[str, Any]) -> list[str]:
    """Doubts about a mask from :func:`skull_mask_from_ct` worth telling the user (empty when none)."""
    if info["dropped_fraction"] > DROPPED_WARN_FRACTION:
        return [f"{100 * info['dropped_fraction']:.0f}% of the voxels at or above {info['bone_hu']:g} HU lie outside the largest "
                f"bone piece and were left out (jaw, spine, or a skull split apart at this --bone-hu?); check the mask"]
    return []


def read_ct_skull(path: str | Path, bone_hu: float = DEFAULT_BONE_HU, series: Collection[str] | str | None = None) -> tuple[Volume, dict[str, Any]]:
    """Read a CT (DICOM series folder, NIfTI or NRRD, in HU) and return its skull mask on the CT's grid, and the mask's info.

    The mask keeps the CT's canonical grid, header and source grid (:func:`skullrec.io.read_volume`),
    so results written from it land on the CT voxel for voxel.
    """
    ct = read_volume(path, mask=False, series=series)
    mask, info = skull_mask_from_ct(ct.data, bone_hu, source=path)
    return ct.like(mask), info
