"""Box geometry of stage 2 on a volume's voxel grid: a cube of whole input voxels around a point, cut, paste, resample.

A box (:class:`skullrec.data.resample.Box`) is a whole number of *input voxels* per axis
(``round(box_mm / spacing)``), so cutting and pasting are plain index slices: a pasted crop lands exactly
where it was cut, at any spacing and axis order. Where a box reaches past the volume the outside reads as
background and is not pasted. The crop is resampled to the network's ``grid^3`` and back here too, so
training samples (:mod:`skullrec.data.stage2`) and prediction (:mod:`skullrec.inference.stage2`) share one
implementation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .resample import Box


def box_around(centre: np.ndarray | tuple[float, ...], spacing: tuple[float, ...], box_mm: float) -> Box:
    """A box of ``round(box_mm / spacing)`` input voxels per axis whose centre is nearest ``centre`` (voxel index)."""
    n = np.array([max(1, int(round(box_mm / float(s)))) for s in spacing])
    lo = np.floor(np.asarray(centre, dtype=np.float64) - (n - 1) / 2.0 + 0.5).astype(int)  # lo + (n-1)/2 nearest centre
    return Box(lo=tuple(int(v) for v in lo), hi=tuple(int(v) for v in lo + n))


def overlap(box: Box, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices into the volume, slices into the crop) of the part of ``box`` inside ``shape``."""
    vol, sub = [], []
    for lo, hi, dim in zip(box.lo, box.hi, shape):
        a, b = max(lo, 0), min(hi, dim)
        if b <= a:
            return None
        vol.append(slice(a, b))
        sub.append(slice(a - lo, b - lo))
    return tuple(vol), tuple(sub)


def crop(data: np.ndarray, box: Box) -> np.ndarray:
    """The voxels of ``data`` inside ``box`` (shape ``box.shape``); outside the volume: 0."""
    out = np.zeros(box.shape, dtype=data.dtype)
    ov = overlap(box, data.shape)
    if ov is not None:
        out[ov[1]] = data[ov[0]]
    return out


def paste(part: np.ndarray, box: Box, shape: tuple[int, ...]) -> np.ndarray:
    """A volume of ``shape`` holding ``part`` at ``box`` (the part of the box inside the volume), 0 elsewhere."""
    if part.shape != box.shape:
        raise ValueError(f"part has shape {part.shape}, box has {box.shape}")
    out = np.zeros(shape, dtype=part.dtype)
    ov = overlap(box, shape)
    if ov is not None:
        out[ov[0]] = part[ov[1]]
    return out


def to_grid(part: np.ndarray, grid: int) -> np.ndarray:
    """A crop resampled to ``grid^3`` (float32): area averaging when shrinking, trilinear when growing."""
    t = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))[None, None]
    shrink = all(s >= grid for s in part.shape)
    mode = "area" if shrink else "trilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(grid,) * 3, mode=mode, **kw)[0, 0].numpy()


def from_grid(prob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A ``grid^3`` map resampled back to a crop's ``shape`` (trilinear, voxel centres aligned as in :func:`to_grid`)."""
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def network_input(defective: np.ndarray, prior_crop: np.ndarray, box: Box, grid: int) -> np.ndarray:
    """The network's (2, grid, grid, grid) float32 input: the defective skull cut at ``box`` and stage 1's
    complete skull in that box (``prior_crop``, shape ``box.shape``), each resampled to the grid.

    The one place the input is made, for training samples (:func:`skullrec.data.stage2.make_sample`)
    and for prediction (:func:`skullrec.inference.stage2.stage2_input`), so the two cannot drift apart.
    """
    if prior_crop.shape != box.shape:
        raise ValueError(f"prior crop has shape {prior_crop.shape}, box has {box.shape}")
    return np.stack([to_grid(crop(np.asarray(defective, dtype=np.uint8), box), grid),
                     to_grid(np.asarray(prior_crop, dtype=np.uint8), grid)]).astype(np.float32)
