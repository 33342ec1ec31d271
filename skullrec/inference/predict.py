"""Defective skulls of any size and spacing -> complete skull + implant on the input's own grid (+ STL).

Per input: :func:`skullrec.data.resample.prepare_volume` (the same crop + downsampling rule as the
training data, crop box from the defective skull) -> batched forward pass -> sigmoid probability
at ``size^3`` -> :func:`skullrec.data.resample.restore_to_grid` (linear interpolation in physical space)
-> threshold -> complete skull on the input grid.

Implant = reconstruction AND NOT defective, restricted to where the model added bone at its own
resolution, with small islands removed. Why the restriction: the reconstruction is made at
~2-3 mm voxels, so its surface lies up to a voxel away from the input's fine bone surface
everywhere; "reconstruction AND NOT defective" alone would leave a thin sheet of false implant
around the whole skull. Where the model *added* bone (prediction AND NOT prepared input, both at
``size^3``) is the defect region; mapped back and intersected, it keeps the implant there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..data.layout import implant_of
from ..data.resample import DEFAULT_MARGIN_MM, prepare_volume, restore_to_grid
from ..errors import InputError
from ..io import Volume, atomic_write_bytes, atomic_write_text, write_nifti
from ..utils import Progress, resolve_device
from .mesh import mesh_from_mask, stl_bytes

# Implant components smaller than this are dropped. 100 mm^3 is ~7 voxels of a 64^3 SkullFix grid
# (about 2.2 x 2.9 x 2.3 mm each) and far below any cranial defect (SkullFix implants are
# ~30,000-70,000 mm^3), so only interpolation crumbs along the defect rim are removed.
MIN_ISLAND_MM3 = 100.0


@dataclass
class Reconstruction:
    """The result for one defective skull.

    Attributes:
        complete: reconstructed complete skull on the input's grid (uint8, input affine and header).
        implant: implant on the input's grid (uint8): complete AND NOT defective, cleaned.
        prepared_input: the ``size^3`` defective skull the model saw (its affine places it in mm).
        prepared_prob: the model's sigmoid probability at ``size^3`` (float32).
        prepared_prediction: ``prepared_prob > threshold`` as a ``size^3`` Volume (same affine as the input one).
        islands_removed: implant components dropped as smaller than ``min_island_mm3``.
    """

    complete: Volume
    implant: Volume
    prepared_input: Volume
    prepared_prob: np.ndarray
    prepared_prediction: Volume
    islands_removed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def implant_empty(self) -> bool:
        return not bool(self.implant.data.any())


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3 (|det| of the affine's linear part; right for oblique grids too)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def remove_small_islands(mask: np.ndarray, affine: np.ndarray, min_mm3: float = MIN_ISLAND_MM3) -> tuple[np.ndarray, int]:
    """Drop 26-connected components smaller than ``min_mm3``; returns (cleaned bool mask, number removed)."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return mask, 0
    sizes = np.bincount(labels.ravel()) * voxel_volume_mm3(affine)
    keep = sizes >= min_mm3
    keep[0] = False
    return keep[labels], int(n - keep[1:].sum())


def _model_size(model: torch.nn.Module) -> int:
    size = getattr(model, "size", None)
    if size is None:
        raise ValueError("model has no 'size' attribute; pass size= to reconstruct")
    return int(size)


def reconstruct(
    model: torch.nn.Module,
    volumes: list[Volume],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    *,
    threshold: float = 0.5,
    margin_mm: float = DEFAULT_MARGIN_MM,
    size: int | None = None,
    min_island_mm3: float = MIN_ISLAND_MM3,
) -> list[Reconstruction]:
    """Reconstruct complete skulls and implants for defective skulls of any size and spacing.

    ``threshold`` applies to the probability interpolated onto the input grid (0.5 = logit 0).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {batch_size}")
    size = int(size) if size is not None else _model_size(model)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: list[Reconstruction] = []
    try:
        for start in range(0, len(volumes), batch_size):
            batch = volumes[start : start + batch_size]
            prepared = [prepare_volume(v, size, margin_mm)[0] for v in batch]
            x = torch.from_numpy(np.stack([p.data for p in prepared]).astype(np.float32)[:, None]).to(device)
            with torch.inference_mode():
                prob = torch.sigmoid(model(x)).float().cpu().numpy()[:, 0]
            for vol, p, pr in zip(batch, prepared, prob):
                results.append(_finish(vol, p, pr, threshold, min_island_mm3))
    finally:
        model.train(was_training)
    return results


def _finish(vol: Volume, prepared: Volume, prob: np.ndarray, threshold: float, min_island_mm3: float) -> Reconstruction:
    """Map one ``size^3`` prediction back to the input grid and derive the implant."""
    pred64 = prob > threshold
    complete = restore_to_grid(prob, prepared.affine, vol) > threshold
    added64 = (pred64 & ~prepared.data.astype(bool)).astype(np.float32)
    added = restore_to_grid(added64, prepared.affine, vol) > 0.5
    defective = vol.data.astype(bool)
    implant, removed = remove_small_islands(implant_of(complete, defective) & added, vol.affine, min_island_mm3)
    header = vol.header
    vox = voxel_volume_mm3(vol.affine)
    info = {
        "complete_voxels": int(complete.sum()),
        "implant_voxels": int(implant.sum()),
        "implant_mm3": round(float(implant.sum()) * vox, 1),
        "islands_removed": removed,
        "prepared_spacing_mm": [round(s, 4) for s in prepared.spacing],
    }
    return Reconstruction(
        complete=Volume(complete.astype(np.uint8), vol.affine, header, vol.path),
        implant=Volume(implant.astype(np.uint8), vol.affine, header, vol.path),
        prepared_input=prepared,
        prepared_prob=prob.astype(np.float32),
        prepared_prediction=Volume(pred64.astype(np.uint8), prepared.affine, None, vol.path),
        islands_removed=removed,
        info=info,
    )


def predict_folder(
    checkpoint: Path,
    inp: Path,
    out: Path,
    stl: bool = False,
    batch_size: int = 8,
    threshold: float | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    stage2: Path | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct every defective skull in ``inp``: out/complete/CASE.nii.gz, out/implant/CASE.nii.gz (+ out/stl/).

    ``threshold`` binarises non-binary *inputs* (value > T); the model output is thresholded at 0.5.
    Returns one row per case (also written to out/predict.json); ``progress(done, total)`` is called
    after each case and ``warn(message)`` for each empty implant. With ``stage2`` (a
    ``skullrec train-implant`` checkpoint) the implant is stage 2's (:mod:`skullrec.inference.stage2`,
    in a box around stage 1's implant) and the complete skull is the defective skull plus that implant.
    """
    from ..data.layout import check_output_dir, staged_output
    from ..io import list_volumes, read_volume
    from ..nets.checkpoint import load_checkpoint

    check_output_dir(out, overwrite)
    files = list_volumes(inp)
    dev = resolve_device(device)
    model, cfg, meta = load_checkpoint(checkpoint, dev)
    model2 = cfg2 = meta2 = None
    if stage2 is not None:
        from ..nets.implant_checkpoint import load_implant_checkpoint

        model2, cfg2, meta2 = load_implant_checkpoint(stage2, dev)
    summary: list[dict[str, Any]] = []
    with staged_output(out, overwrite) as staging:
        ids = list(files)
        if progress is not None:
            progress(0, len(ids))
        # Read only one batch at a time: a 512^3 input is ~130 MB as uint8 plus float work arrays.
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            vols = [read_volume(files[cid], threshold=threshold) for cid in chunk]
            for cid, vol in zip(chunk, vols):
                if not vol.data.any():
                    raise InputError(f"{files[cid]}: no bone voxels (empty mask)")
            recs = reconstruct(model, vols, batch_size=batch_size, device=dev, size=cfg.model.size)
            for cid, vol, rec in zip(chunk, vols, recs):
                if model2 is not None:
                    rec = _apply_stage2(rec, vol, model2, cfg2, dev)
                write_nifti(staging / "complete" / f"{cid}.nii.gz", rec.complete.data, vol.affine, vol.header)
                write_nifti(staging / "implant" / f"{cid}.nii.gz", rec.implant.data, vol.affine, vol.header)
                row = {"case_id": cid, "input": str(files[cid]), **rec.info, "implant_empty": rec.implant_empty}
                if stl:
                    for kind, mask in (("complete", rec.complete.data), ("implant", rec.implant.data)):
                        verts, faces = mesh_from_mask(mask, vol.affine)
                        if len(faces) == 0:
                            continue  # an empty implant has no surface: reported below, no file
                        atomic_write_bytes(staging / "stl" / f"{cid}_{kind}.stl", stl_bytes(verts, faces, f"skullrec {cid} {kind} (mm)"))
                if rec.implant_empty and warn is not None:
                    warn(f"{cid}: empty implant (the model added no bone outside the defective skull)")
                summary.append(row)
                if progress is not None:
                    progress(len(summary), len(ids))
        report = {"checkpoint": str(checkpoint), "checkpoint_meta": meta,
                  "stage2": None if stage2 is None else str(stage2), "stage2_meta": meta2, "input": str(inp), "device": str(dev),
                  "model_size": cfg.model.size, "min_island_mm3": MIN_ISLAND_MM3, "cases": summary}
        atomic_write_text(staging / "predict.json", json.dumps(report, indent=1, default=str) + "\n")
    return summary




def _apply_stage2(rec: Reconstruction, vol: Volume, model2: torch.nn.Module, cfg2: Any, device: torch.device) -> Reconstruction:
    """Replace stage 1's implant by stage 2's; the complete skull becomes defective OR that implant."""
    from .stage2 import stage2_implant

    implant, info = stage2_implant(model2, vol, rec.complete.data.astype(bool), rec.implant.data.astype(bool),
                                   cfg2.net.box_mm, cfg2.net.grid, device)
    complete = vol.data.astype(bool) | implant
    vox = voxel_volume_mm3(vol.affine)
    new_info = {**rec.info, "stage1_implant_voxels": rec.info["implant_voxels"], "implant_voxels": int(implant.sum()),
                "implant_mm3": round(float(implant.sum()) * vox, 1), "complete_voxels": int(complete.sum()), "stage2": info}
    return Reconstruction(
        complete=Volume(complete.astype(np.uint8), vol.affine, vol.header, vol.path),
        implant=Volume(implant.astype(np.uint8), vol.affine, vol.header, vol.path),
        prepared_input=rec.prepared_input, prepared_prob=rec.prepared_prob, prepared_prediction=rec.prepared_prediction,
        islands_removed=rec.islands_removed, info=new_info,
    )
