"""Defective skulls of any size and spacing -> complete skull + implant on the input's own grid (+ STL).

Per input: :func:`skullrec.data.resample.prepare_volume` (the same crop + downsampling rule as the
training data, crop box from the defective skull) -> batched forward pass -> bone probability (sigmoid
of the bone log-odds, either loss) at ``size^3`` -> :func:`skullrec.data.resample.restore_mask` (linear
interpolation in physical space, then threshold) -> complete skull on the input grid.

Implant = reconstruction AND NOT defective, restricted to where the model added bone at its own
resolution, with small islands removed. Why the restriction: the reconstruction is made at
~2-3 mm voxels, so its surface lies up to a voxel away from the input's fine bone surface
everywhere; "reconstruction AND NOT defective" alone would leave a thin sheet of false implant
around the whole skull. Where the model *added* bone (prediction AND NOT prepared input, both at
``size^3``) is the defect region; mapped back and intersected, it keeps the implant there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..data.ct import DEFAULT_BONE_HU, mask_warnings, read_ct_skull
from ..data.layout import implant_of
from ..data.resample import DEFAULT_MARGIN_MM, prepare_volume, restore_mask, restore_to_grid
from ..errors import InputError, check_choice
from ..io import Volume, atomic_write_bytes, atomic_write_text, output_suffix, write_volume
from ..nets.autoencoder import bone_logit
from ..utils import Progress, bounding_box, resolve_device
from .mesh import count_shells, lps_affine, printable_mesh, stl_bytes, stl_name

# Implant components smaller than this are dropped. 100 mm^3 is ~7 voxels of a 64^3 SkullFix grid
# (about 2.2 x 2.9 x 2.3 mm each) and far below any cranial defect (SkullFix implants are
# ~30,000-70,000 mm^3), so only interpolation crumbs along the defect rim are removed.
MIN_ISLAND_MM3 = 100.0

# Plausibility of an input as a (defective) skull, in physical units. An adult skull has some
# 400-900 cm^3 of bone and spans ~140-200 mm (SkullFix: 512 x 512 voxels of ~0.45 mm in plane);
# the model was trained on such heads. Below the hard limits the input cannot be a skull at all
# (a single voxel, a speck of noise) and no result is written; outside the soft range it is
# reconstructed with a warning (a child's skull, a partial scan, a phantom, a wrong spacing).
MIN_BONE_MM3 = 1_000.0  # hard: 1 cm^3
MIN_EXTENT_MM = 20.0  # hard: on every axis
PLAUSIBLE_BONE_CM3 = (100.0, 2_500.0)  # soft
PLAUSIBLE_EXTENT_MM = (80.0, 320.0)  # soft, largest extent of the bone's bounding box


@dataclass
class Reconstruction:
    """The result for one defective skull.

    Attributes:
        complete: reconstructed complete skull on the input's grid (uint8, input affine, header and
            source grid: :func:`skullrec.io.write_volume` writes it in the input file's own voxel order).
        implant: implant on the input's grid (uint8): complete AND NOT defective, cleaned.
        prepared_input: the ``size^3`` defective skull the model saw (its affine places it in mm).
        prepared_prob: the model's sigmoid probability at ``size^3`` (float32).
        prepared_prediction: ``prepared_prob > threshold`` as a ``size^3`` Volume (same affine as the input one).
        islands_removed: implant components dropped as smaller than ``min_island_mm3``.
        problems: why this result is not usable (non-finite model output, empty reconstruction,
            an input that cannot be a skull); an unusable result is never written as one.
        warnings: doubts that still leave a usable result (an input outside the usual skull range).
    """

    complete: Volume
    implant: Volume
    prepared_input: Volume
    prepared_prob: np.ndarray
    prepared_prediction: Volume
    islands_removed: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def implant_empty(self) -> bool:
        return not bool(self.implant.data.any())

    @property
    def usable(self) -> bool:
        """True when the result may be written (no entry in ``problems``)."""
        return not self.problems


def input_plausibility(vol: Volume) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a defective skull as model input, from its bone volume and extent in mm.

    Problems (below :data:`MIN_BONE_MM3` / :data:`MIN_EXTENT_MM`) mean it cannot be a skull;
    warnings (outside :data:`PLAUSIBLE_BONE_CM3` / :data:`PLAUSIBLE_EXTENT_MM`) that it is unlike one.
    """
    n = int(np.count_nonzero(vol.data))  # counted in place: no bool copy of a 512^3 volume
    if n == 0:
        return ["no bone voxels (empty mask)"], []
    bone_mm3 = n * voxel_volume_mm3(vol.affine)
    lo, hi = bounding_box(vol.data)
    extent = [float((h - l) * s) for l, h, s in zip(lo, hi, vol.spacing)]
    problems, warnings = [], []
    if bone_mm3 < MIN_BONE_MM3 or min(extent) < MIN_EXTENT_MM:
        problems.append(
            f"input is far from a plausible skull: {bone_mm3:.0f} mm^3 of bone ({n} voxels) spanning "
            + " x ".join(f"{e:.0f}" for e in extent) + f" mm (a skull has > {MIN_BONE_MM3 / 1000:g} cm^3 and > {MIN_EXTENT_MM:g} mm on every axis)"
        )
    else:
        lo, hi = PLAUSIBLE_BONE_CM3
        if not lo <= bone_mm3 / 1000 <= hi:
            warnings.append(f"{bone_mm3 / 1000:.0f} cm^3 of bone is outside the usual {lo:g}-{hi:g} cm^3 of a skull")
        lo, hi = PLAUSIBLE_EXTENT_MM
        if not lo <= max(extent) <= hi:
            warnings.append(f"bone spans {max(extent):.0f} mm, outside the usual {lo:g}-{hi:g} mm of a skull")
    return problems, warnings


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3 (|det| of the affine's linear part; right for oblique grids too)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def remove_small_islands(mask: np.ndarray, affine: np.ndarray, min_mm3: float = MIN_ISLAND_MM3) -> tuple[np.ndarray, int]:
    """Drop 26-connected components smaller than ``min_mm3``; returns (cleaned bool mask, number removed)."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return mask, 0
    # Counted over the mask's voxels only: bincount casts its input to int64, which for the whole
    # label array of a 512^3 grid is a 1 GB copy.
    sizes = np.bincount(labels[mask], minlength=n + 1) * voxel_volume_mm3(affine)
    small = np.flatnonzero(sizes[1:] < min_mm3) + 1
    kept = mask.copy()
    # Clear each small component inside its own bounding box: the few crumbs cost little, where
    # ``keep[labels]`` would index the whole (512^3-sized) label array.
    boxes = ndimage.find_objects(labels)
    for lab in small:
        box = boxes[lab - 1]
        kept[box][labels[box] == lab] = False
    return kept, int(small.size)


def implant_from_reconstruction(
    complete: np.ndarray, defective: np.ndarray, added: np.ndarray, affine: np.ndarray, min_island_mm3: float = MIN_ISLAND_MM3,
) -> tuple[np.ndarray, int]:
    """The implant users get: complete AND NOT defective, restricted to ``added``, small islands removed.

    ``added`` is where the model added bone at its own resolution, mapped onto this grid (module
    docstring). On the model's own grid (the experiment's prepared volumes) it is complete AND NOT
    defective itself, so only the island removal acts. Returns (bool mask, number of islands removed).
    """
    return remove_small_islands(implant_of(complete, defective) & np.asarray(added, dtype=bool), affine, min_island_mm3)


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
                logits = bone_logit(model(x)).float()  # bone log-odds, either head (sigmoid: probability)
                finite = torch.isfinite(logits).flatten(1).all(dim=1).cpu().numpy()
                prob = torch.sigmoid(logits).cpu().numpy()[:, 0]
            for vol, p, pr, ok in zip(batch, prepared, prob, finite):
                rec = _finish(vol, p, np.nan_to_num(pr, nan=0.0), threshold, min_island_mm3)
                problems, warnings = input_plausibility(vol)
                if not ok:
                    problems.append("the model output is not finite (NaN or inf logits); the checkpoint or the input is broken")
                elif not rec.complete.data.any():
                    problems.append("empty reconstruction (the model predicted no bone at all)")
                rec.problems, rec.warnings = problems, warnings
                results.append(rec)
    finally:
        model.train(was_training)
    return results


def stage1_complete_in_box(model: torch.nn.Module, vol: Volume, box: Any, size: int, *, threshold: float = 0.5,
                           margin_mm: float = DEFAULT_MARGIN_MM) -> np.ndarray:
    """Stage 1's complete skull inside ``box`` (an index box of ``vol``'s grid), as :func:`reconstruct` makes it.

    Equal to ``crop(reconstruct(...).complete.data, box)`` (box voxels outside the volume are 0, as
    :func:`skullrec.inference.stage2.crop` reads them), but the 64^3 prediction is interpolated at the
    box's voxels only: stage-2 training samples need the prior in their box and nothing else, and a
    512^2 x Z grid is ~4x the box's voxels (tests/training/test_train_implant.py checks the equality).
    """
    from .stage2 import crop

    was_training = model.training
    model.eval()
    try:
        prepared = prepare_volume(vol, size, margin_mm)[0]
        x = torch.from_numpy(prepared.data.astype(np.float32)[None, None])
        with torch.inference_mode():
            prob = torch.sigmoid(bone_logit(model(x)).float()).numpy()[0, 0]
    finally:
        model.train(was_training)
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(box.lo, dtype=np.float64)
    target = Volume(np.zeros(box.shape, dtype=np.uint8), np.asarray(vol.affine, dtype=np.float64) @ shift)
    inside = crop(np.ones(vol.shape, dtype=bool), box)
    return (restore_to_grid(np.nan_to_num(prob, nan=0.0), prepared.affine, target) > threshold) & inside


def _finish(vol: Volume, prepared: Volume, prob: np.ndarray, threshold: float, min_island_mm3: float) -> Reconstruction:
    """Map one ``size^3`` prediction back to the input grid and derive the implant.

    Equal to ``restore_to_grid(prob) > threshold`` and :func:`implant_from_reconstruction` on whole
    volumes (tests/inference/test_predict_fast.py), computed faster: the separable interpolation of
    :func:`restore_mask`, and the implant only inside the box where the model added bone (outside it
    the implant is empty, so its components and their sizes are the same).
    """
    pred64 = prob > threshold
    complete = restore_mask(prob, prepared.affine, vol, threshold)
    added64 = (pred64 & ~prepared.data.astype(bool)).astype(np.float32)
    added = restore_mask(added64, prepared.affine, vol, 0.5)
    implant = np.zeros(vol.shape, dtype=bool, order="F")
    removed = 0
    box = bounding_box(added)
    if box is not None:
        crop = tuple(slice(lo, hi) for lo, hi in zip(*box))
        implant[crop], removed = implant_from_reconstruction(complete[crop], vol.data[crop], added[crop], vol.affine, min_island_mm3)
    vox = voxel_volume_mm3(vol.affine)
    n_implant = int(np.count_nonzero(implant))
    info = {
        "complete_voxels": int(np.count_nonzero(complete)),
        "implant_voxels": n_implant,
        "implant_mm3": round(float(n_implant) * vox, 1),
        "islands_removed": removed,
        "prepared_spacing_mm": [round(s, 4) for s in prepared.spacing],
    }
    return Reconstruction(
        # bool -> uint8 as a view: the same bytes, no 512^3 copy
        complete=vol.like(complete.view(np.uint8)),
        implant=vol.like(implant.view(np.uint8)),
        prepared_input=prepared,
        prepared_prob=prob.astype(np.float32),
        prepared_prediction=Volume(pred64.astype(np.uint8), prepared.affine, None, vol.path),
        islands_removed=removed,
        info=info,
    )


def finish_reference(vol: Volume, prepared: Volume, prob: np.ndarray, threshold: float = 0.5,
                     min_island_mm3: float = MIN_ISLAND_MM3) -> tuple[np.ndarray, np.ndarray, int]:
    """(complete, implant, islands removed) of :func:`_finish` the straightforward way, on whole volumes.

    scipy's general ``affine_transform`` for both maps and the islands labelled on the whole grid: the
    implementation predict had before it was made fast, kept as the reference the fast path is tested
    (tests/inference/test_predict_fast.py) and benchmarked (benchmarks/predict_speed.py) against.
    """

    pred64 = prob > threshold
    complete = restore_to_grid(prob, prepared.affine, vol) > threshold
    added64 = (pred64 & ~prepared.data.astype(bool)).astype(np.float32)
    added = restore_to_grid(added64, prepared.affine, vol) > 0.5
    implant, removed = implant_from_reconstruction(complete, vol.data.astype(bool), added, vol.affine, min_island_mm3)
    return complete, implant, removed


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect what the ``skullrec`` logger warns (e.g. :func:`skullrec.io.read_volume` about an input
    without orientation) into a list instead of printing it, so the caller prints it once and also
    records it (predict.json); other loggers and levels are untouched."""
    kept: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    logger = logging.getLogger("skullrec")
    handler = _Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield kept
    finally:
        logger.removeHandler(handler)


def input_files(inp: Path) -> dict[str, Path]:
    """Case id -> file of ``predict --in``: every volume file of a folder, or one volume file given alone."""
    from ..io import case_id, is_volume_file, list_volumes, VOLUME_SUFFIXES

    inp = Path(inp)
    if inp.is_file():
        if not is_volume_file(inp):
            raise InputError(f"{inp}: unknown file type (expected one of {', '.join(VOLUME_SUFFIXES)}, or a folder of them)")
        return {case_id(inp): inp}
    return list_volumes(inp)


OUTPUT_SUFFIXES = {"auto": "", "nifti": ".nii.gz", "nrrd": ".nrrd"}  # predict --format


def check_output_options(stl: bool, stl_skull: bool, smooth: bool, out_format: str) -> bool:
    """Whether STL meshes are written (``stl_skull`` implies ``stl``); InputError for ``smooth`` without them or an
    unknown ``out_format``. Called by ``predict`` before anything is loaded, and by :func:`predict_folder`."""
    stl = bool(stl or stl_skull)
    if smooth and not stl:
        raise InputError("--smooth: smooths the STL meshes, and none is written (add --stl)")
    check_choice("--format", out_format, list(OUTPUT_SUFFIXES))
    return stl


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
    keep_stage1: bool = False,
    mirror: bool = False,
    ct: bool = False,
    bone_hu: float = DEFAULT_BONE_HU,
    series: Collection[str] | None = None,
    stl_skull: bool = False,
    smooth: bool = False,
    out_format: str = "auto",
) -> list[dict[str, Any]]:
    """Reconstruct every defective skull in ``inp`` (a folder, or one file): out/complete/CASE.EXT,
    out/implant/CASE.EXT (+ out/stl/CASE_implant.stl).

    EXT is the input's format with ``out_format`` "auto": ``.nrrd`` for a NRRD input, ``.nii.gz`` for a
    NIfTI one or a DICOM series; "nifti" or "nrrd" choose one for every case. Always on the input's own grid. ``stl``: the implant's surface as a binary STL in LPS mm
    (:mod:`skullrec.inference.mesh`), ``stl_skull`` the complete skull's too (implies ``stl``),
    ``smooth`` smooths them (within 0.5 mm of the voxel surface).
    ``threshold`` binarises non-binary *inputs* (value > T); the model output is thresholded at 0.5.
    Returns one row per case (also written to out/predict.json); ``progress(done, total)`` is called
    after each case and ``warn(message)`` for each warning (reading an input, an empty implant, a
    doubtful input, an unusable result); every such message is also in predict.json, under the
    case's ``warnings`` and in the top-level ``warnings`` list.
    An unusable result (see :attr:`Reconstruction.problems`) is not written; it is listed under
    ``failed`` in predict.json, and when no case is usable the call fails with InputError and
    leaves nothing behind. With ``stage2`` (a ``skullrec train-implant`` checkpoint) the implant is
    stage 2's (:mod:`skullrec.inference.stage2`, in a box around stage 1's implant) and the
    complete skull is the defective skull plus that implant; ``keep_stage1`` also writes stage 1's
    implant to out/stage1_implant/; ``mirror`` averages stage 2 over the box and its
    left-right mirror image (test-time augmentation).

    ``inp`` may also hold DICOM series (one series folder, or a folder of series folders: one case
    each, see :func:`skullrec.io.list_volumes`); ``series`` picks the series of folders holding
    several. With ``ct`` every input is a CT in HU, made into a skull mask by
    :func:`skullrec.data.ct.read_ct_skull` (bone >= ``bone_hu``), written to out/ct_mask/CASE.EXT.
    """
    from ..data.layout import check_output_dir, staged_output
    from ..io import read_volume
    from ..nets.checkpoint import load_checkpoint

    inputs = (inp, checkpoint, stage2)  # replacing the output must never delete an input
    check_output_dir(out, overwrite, inputs)
    all_warnings: list[str] = []
    say_out = warn or logging.getLogger("skullrec").warning

    def say(msg: str, case: list[str] | None = None) -> None:
        say_out(msg)
        all_warnings.append(msg)
        if case is not None:
            case.append(msg)

    with captured_warnings() as listed:
        files = input_files(inp)
    for msg in listed:
        say(msg)
    if series:
        check_series_choice(files, series, inp)
    stl = check_output_options(stl, stl_skull, smooth, out_format)
    dev = resolve_device(device)
    model, cfg, meta = load_checkpoint(checkpoint, dev)
    model2 = cfg2 = meta2 = None
    if stage2 is not None:
        from ..nets.checkpoint import load_implant_checkpoint

        model2, cfg2, meta2 = load_implant_checkpoint(stage2, dev)
    summary: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    done = 0
    with staged_output(out, overwrite, inputs) as staging:
        ids = list(files)
        if progress is not None:
            progress(0, len(ids))
        # Read only one batch at a time: a 512^3 input is ~130 MB as uint8 plus float work arrays.
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            vols, ct_infos, read_warnings = [], [], []
            for cid in chunk:
                with captured_warnings() as caught:  # printed below and kept with the case
                    if ct:
                        vol, ct_info = read_ct_skull(files[cid], bone_hu, series)
                    else:
                        vol, ct_info = read_volume(files[cid], threshold=threshold, series=series), None
                vols.append(vol)
                ct_infos.append(ct_info)
                read_warnings.append(caught)
            for cid, vol in zip(chunk, vols):
                if not vol.data.any():
                    raise InputError(f"{files[cid]}: no bone voxels (empty mask)")
            recs = reconstruct(model, vols, batch_size=batch_size, device=dev, size=cfg.model.size)
            for cid, vol, rec, ct_info, caught in zip(chunk, vols, recs, ct_infos, read_warnings):
                done += 1
                case_warnings: list[str] = []
                for msg in caught:
                    say(msg, case_warnings)
                if ct_info is not None:
                    rec.warnings = mask_warnings(ct_info) + rec.warnings
                for w in rec.warnings:
                    say(f"warning: {files[cid]}: {w}", case_warnings)
                if not rec.usable:
                    # Garbage is never written as a result: report it, write nothing for this case.
                    say(f"warning: {files[cid]}: no result written: {'; '.join(rec.problems)}", case_warnings)
                    failed.append({"case_id": cid, "input": str(files[cid]), "problems": rec.problems,
                                   "warnings": case_warnings})
                    if progress is not None:
                        progress(done, len(ids))
                    continue
                ext = OUTPUT_SUFFIXES.get(out_format) or output_suffix(files[cid])  # auto: NRRD in, NRRD out; else NIfTI
                if model2 is not None:
                    if keep_stage1:  # stage 1's own implant beside stage 2's, to compare the two on one run
                        write_volume(staging / "stage1_implant" / f"{cid}{ext}", rec.implant)
                    rec = apply_stage2(rec, vol, model2, cfg2, dev, mirror=mirror)
                # Back on the input file's own grid: its voxel order, affine and header.
                write_volume(staging / "complete" / f"{cid}{ext}", rec.complete)
                write_volume(staging / "implant" / f"{cid}{ext}", rec.implant)
                row = {"case_id": cid, "input": str(files[cid]), **rec.info, "implant_empty": rec.implant_empty}
                if ct_info is not None:  # the skull mask made from the CT, to check what the model was given
                    write_volume(staging / "ct_mask" / f"{cid}{ext}", vol)
                    row["ct"] = ct_info
                if rec.implant_empty:
                    say(f"warning: {files[cid]}: empty implant (the model added no bone outside the defective skull)", case_warnings)
                if stl:
                    # LPS mm, where ITK / 3D Slicer place the volume written beside it (skullrec.inference.mesh).
                    frame = lps_affine(vol.affine)
                    kinds = (("implant", rec.implant.data),) + ((("complete", rec.complete.data),) if stl_skull else ())
                    for kind, mask in kinds:
                        verts, faces = printable_mesh(mask, frame, smooth=smooth)
                        if len(faces) == 0:
                            continue  # an empty implant has no surface: reported above, no file
                        atomic_write_bytes(staging / "stl" / f"{cid}_{kind}.stl", stl_bytes(verts, faces, stl_name(cid, kind)))
                        if kind == "implant":
                            row["implant_stl_pieces"] = pieces = count_shells(verts, faces)
                            if pieces > 1:
                                say(f"warning: {files[cid]}: the implant STL has {pieces} separate pieces", case_warnings)
                row["warnings"] = case_warnings
                summary.append(row)
                if progress is not None:  # after stage 2 and the files: a case is done when its outputs are
                    progress(done, len(ids))
        if not summary:
            # No usable output at all: fail (exit 2) and leave nothing behind (the staging folder goes).
            first = failed[0]
            more = f" (and {len(failed) - 1} more cases)" if len(failed) > 1 else ""
            raise InputError(f"{first['input']}: no usable result: {'; '.join(first['problems'])}{more}")
        report = {"checkpoint": str(checkpoint), "checkpoint_meta": meta,
                  "stage2": None if stage2 is None else str(stage2), "stage2_meta": meta2, "stage2_mirror": mirror, "input": str(inp), "device": str(dev),
                  "model_size": cfg.model.size, "min_island_mm3": MIN_ISLAND_MM3,
                  "stl": None if not stl else {"parts": ["implant", "complete"] if stl_skull else ["implant"],
                                               "frame": "LPS", "units": "mm", "smooth": smooth},
                  "ct": {"bone_hu": bone_hu} if ct else None, "series": sorted(series) if series else None,
                  "warnings": all_warnings, "cases": summary, "failed": failed}
        atomic_write_text(staging / "predict.json", json.dumps(report, indent=1, default=str) + "\n")
    return summary




def check_series_choice(files: dict[str, Path], series: Collection[str], inp: Path) -> None:
    """Refuse ``--series`` UIDs that no DICOM case of ``files`` holds (before any volume is read)."""
    from ..io import dicom_series, is_dicom_folder

    folders = [p for p in files.values() if is_dicom_folder(p)]
    if not folders:
        raise InputError(f"--series: {inp} holds no DICOM series (--series picks one of a DICOM folder's series)")
    known = set()
    for folder in folders:
        known.update(dicom_series(folder))
    missing = sorted(set(series) - known)
    if missing:
        raise InputError(f"--series {missing[0]}: no such series in {inp}")


def apply_stage2(rec: Reconstruction, vol: Volume, model2: torch.nn.Module, cfg2: Any, device: torch.device,
                 mirror: bool = False) -> Reconstruction:
    """Replace stage 1's implant by stage 2's; the complete skull becomes defective OR that implant.

    ``mirror``: average stage 2 over the box and its left-right mirror image (see :func:`stage2_implant`)."""
    from .stage2 import deep_defect_centre, stage2_implant

    # the box goes where stage 1 added bone far from the remaining skull, not around its false sheets
    centre = deep_defect_centre(rec.prepared_input, rec.prepared_prediction, vol.affine)
    implant, info = stage2_implant(model2, vol, rec.complete.data.astype(bool), rec.implant.data.astype(bool),
                                   cfg2.net.box_mm, cfg2.net.grid, device, centre=centre, mirror=mirror)
    complete = vol.data.astype(bool) | implant
    n_implant = int(np.count_nonzero(implant))  # once, not once per key: a pass over the whole 512^2 x Z grid
    new_info = {**rec.info, "stage1_implant_voxels": rec.info["implant_voxels"], "implant_voxels": n_implant,
                "implant_mm3": round(n_implant * voxel_volume_mm3(vol.affine), 1), "complete_voxels": int(np.count_nonzero(complete)),
                "stage2": info}
    return dataclasses.replace(rec, complete=vol.like(complete.astype(np.uint8)), implant=vol.like(implant.astype(np.uint8)), info=new_info)
