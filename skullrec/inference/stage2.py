"""Stage 2: the implant designed near the input's own resolution, in a fixed box around the defect.

Stage 1 (the 64^3 autoencoder, :mod:`skullrec.inference.predict`) localises the defect and gives a
shape prior. Stage 2:

1. **Locate** the defect: the deepest part of the bone stage 1 added, far from the remaining skull
   (:func:`deep_defect_centre`, what predict uses; :func:`defect_centre`, the bounding-box centre of
   stage 1's largest implant piece, is the fallback of :func:`stage2_input` without a centre).
2. **Box**: a cube of ``box_mm`` on each side centred there, as a whole number of *input voxels*
   per axis (``round(box_mm / spacing)``), so cutting and pasting are plain index slices
   (:func:`crop`, :func:`paste`): a pasted crop lands exactly where it was cut, at any spacing and
   axis order (the box follows the array axes, and a permuted volume gives the permuted box).
   Where the box reaches past the volume, the outside reads as background and is not pasted.
3. **Network grid**: the crop is resampled to ``grid^3`` (area averaging, i.e. each grid voxel's
   bone fraction, so thin bone is not skipped) for the UNet of :mod:`skullrec.nets.implant_net`,
   whose two input channels are the defective skull and stage 1's complete skull in the box.
   Its probability is resampled back to the crop's shape (trilinear) and pasted.
4. **Restrict**: the implant is ``probability > 0.5 AND NOT defective`` (it never overlaps the
   defective skull) and only its largest 26-connected piece that touches stage 1's implant is kept
   (the largest piece if none does), so it is one piece; computed inside the mask's bounding box
   (:func:`restrict_in_box`).

Box size (SkullFix, ``benchmarks/results/skullfix_defects.json``): the 100 implants' axis-aligned
extents are at most 106.1 x 89.3 x 65.6 mm (median 88.9 x 65.5 x 44.4 mm); a 128 mm cube holds the
largest with 11 mm to spare on its longest side for stage 1's localisation error, and a cube rather
than a slab because set-2 defects sit at other positions and orientations. At the default grid of
128 that is 1.0 mm voxels (SkullFix is 0.45 x 0.45 x 0.63 mm; 1 mm is what a 2-core CPU can train).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..data.box import box_around, crop, from_grid, network_input, overlap, paste, to_grid  # noqa: F401  (re-exported)
from ..data.resample import Box
from ..io import Volume
from ..utils import bounding_box

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood, as predict's island removal


def _pieces(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(26-connected labels of ``mask``, voxel count per label with the background's set to 0)."""
    labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` (empty in, empty out)."""
    labels, sizes = _pieces(mask)
    if sizes.size == 1:
        return np.zeros(mask.shape, dtype=bool)
    return labels == int(np.argmax(sizes))


def defect_centre(stage1_implant: np.ndarray) -> np.ndarray | None:
    """Voxel-index centre of the bounding box of stage 1's largest implant piece; None when it is empty."""
    piece = largest_piece(np.asarray(stage1_implant, dtype=bool))
    bb = bounding_box(piece)
    if bb is None:
        return None
    return (np.asarray(bb[0], dtype=np.float64) + np.asarray(bb[1], dtype=np.float64) - 1.0) / 2.0


def deep_defect_centre(prepared_input: Volume, prepared_prediction: Volume, target_affine: np.ndarray) -> np.ndarray | None:
    """Voxel-index centre (on the grid of ``target_affine``) of the deepest part of stage 1's added bone.

    Stage 1 also adds thin false sheets all around the skull, so the largest piece of its implant
    often spans the whole vault and its box centre misses the defect (SkullFix held-out skulls: up
    to 60 mm off). The hole itself is where added bone lies far from the remaining bone: at stage
    1's own 64^3 grid, the added voxels farther from the defective skull than half the largest such
    distance (scipy's exact EDT in mm), their largest 26-connected piece, its bounding-box centre
    (measured on 8 held-out skulls: within 0.1-9 mm per axis, inside the +-10 mm training jitter).
    """
    inp = np.asarray(prepared_input.data, dtype=bool)
    added = np.asarray(prepared_prediction.data, dtype=bool) & ~inp
    if not added.any():
        return None
    dist = ndimage.distance_transform_edt(~inp, sampling=prepared_input.spacing) if inp.any() else np.ones(inp.shape)
    depth = np.where(added, dist, 0.0)
    piece = largest_piece(added & (depth > 0.5 * depth.max()))
    bb = bounding_box(piece)
    c64 = (np.asarray(bb[0], dtype=np.float64) + np.asarray(bb[1], dtype=np.float64) - 1.0) / 2.0
    m = np.linalg.inv(np.asarray(target_affine, dtype=np.float64)) @ np.asarray(prepared_input.affine, dtype=np.float64)
    return (m @ np.r_[c64, 1.0])[:3]


def restrict_implant(mask: np.ndarray, defective: np.ndarray, stage1_implant: np.ndarray) -> np.ndarray:
    """``mask AND NOT defective``, then its largest 26-connected piece touching ``stage1_implant`` (else the largest)."""
    m = np.asarray(mask, dtype=bool) & ~np.asarray(defective, dtype=bool)
    labels, sizes = _pieces(m)
    if sizes.size == 1:
        return m
    touching = np.unique(labels[np.asarray(stage1_implant, dtype=bool) & (labels > 0)])
    if touching.size:
        keep = int(touching[np.argmax(sizes[touching])])
    else:
        keep = int(np.argmax(sizes))
    return labels == keep


def restrict_in_box(mask_box: np.ndarray, box: Box, defective: np.ndarray, stage1_implant: np.ndarray) -> tuple[np.ndarray, int]:
    """``restrict_implant(paste(mask_box, box, shape), defective, stage1_implant)`` and the pasted mask's voxel count.

    The same result (tests/inference/test_stage2_geometry.py compares the two), computed inside the
    bounding box of the pasted mask only: the pasted mask is empty elsewhere, so no piece reaches past
    that box, and labelling a few million voxels instead of the whole 512 x 512 x Z volume (60 M) is
    what made stage 2 the slowest part of ``predict`` (2.5 s of labels per SkullFix case).
    """
    # In the defective skull's memory order (the files' Fortran order): predict ORs the two next, and
    # a C- with an F-ordered 60 M-voxel array is a strided pass, several times slower.
    out = np.zeros_like(defective, dtype=bool)
    ov = overlap(box, defective.shape)
    bb = None if ov is None else bounding_box(mask_box[ov[1]])
    if bb is None:
        return out, 0
    vol_sl, sub_sl = ov
    inner = tuple(slice(s.start + a, s.start + b) for s, a, b in zip(sub_sl, *bb))
    outer = tuple(slice(v.start + a, v.start + b) for v, a, b in zip(vol_sl, *bb))
    m = mask_box[inner]
    out[outer] = restrict_implant(m, defective[outer], stage1_implant[outer])
    return out, int(np.count_nonzero(m))


@dataclass
class Stage2Input:
    """The network input of one case and where its box sits on the input grid."""

    x: np.ndarray  # (2, grid, grid, grid) float32: defective crop, stage-1 complete crop
    box: Box
    centre: np.ndarray


def stage2_input(defective: np.ndarray, stage1_complete: np.ndarray, stage1_implant: np.ndarray,
                 spacing: tuple[float, ...], box_mm: float, grid: int, centre: np.ndarray | None = None) -> Stage2Input | None:
    """Locate the defect (or use ``centre``), cut the box and build the two-channel input; None when stage 1 found no defect."""
    if centre is None:
        centre = defect_centre(stage1_implant)
    if centre is None:
        return None
    box = box_around(centre, spacing, box_mm)
    x = network_input(defective, crop(np.asarray(stage1_complete, dtype=bool), box), box, grid)
    return Stage2Input(x=x, box=box, centre=centre)


def stage2_implant(model: torch.nn.Module, vol: Volume, stage1_complete: np.ndarray, stage1_implant: np.ndarray,
                   box_mm: float, grid: int, device: str | torch.device = "cpu", amp: str = "none",
                   centre: np.ndarray | None = None, mirror: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Stage 2 on one defective skull: the implant on the input grid (bool) and what was done (info).

    Without a defect from stage 1 (empty stage-1 implant) the result is empty and ``info['box']`` None.
    ``amp="bf16"`` runs the network under bfloat16 autocast (``skullrec predict`` uses fp32; the two
    agree to within the tolerance tests/inference/test_stage2_geometry.py states). ``mirror``: test-time
    augmentation, the probability is the mean of the network's on the box and, flipped back, on its
    left-right mirror image (array axis 0 is left-right in skullrec's canonical voxel order); twice the
    network time.
    """
    from ..training.speed import amp_context, resolve_amp

    defective = vol.data.astype(bool)
    inp = stage2_input(defective, stage1_complete, stage1_implant, vol.spacing, box_mm, grid, centre=centre)
    if inp is None:
        return np.zeros(vol.shape, dtype=bool), {"box": None}
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(inp.x)[None].to(device)
        with torch.inference_mode(), amp_context(resolve_amp(amp, x.device), x.device):
            logits = model(x).float().cpu().numpy()[0, 0]
            # dims (batch, channel, axis 0, 1, 2): the box's axis 0 mirrored in, the output mirrored back
            mirrored = model(torch.flip(x, dims=(2,))).float().cpu().numpy()[0, 0, ::-1] if mirror else None
    finally:
        model.train(was_training)
    prob_grid = 1.0 / (1.0 + np.exp(-logits))
    if mirrored is not None:
        prob_grid = 0.5 * (prob_grid + 1.0 / (1.0 + np.exp(-mirrored)))
    prob = from_grid(prob_grid, inp.box.shape)
    implant, raw = restrict_in_box(prob > 0.5, inp.box, defective, np.asarray(stage1_implant, dtype=bool))
    return implant, {"box": inp.box.to_dict(), "box_centre_vox": [round(float(c), 1) for c in inp.centre],
                     "stage2_raw_voxels": raw, "stage2_voxels": int(np.count_nonzero(implant))}
