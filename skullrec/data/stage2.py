"""Stage-2 samples and defect sets at the skull's own resolution (built by ``skullrec prepare-implant`` with
:mod:`skullrec.inference.samples`, and ``skullrec prepare-eval``).

For every *training* skull of a prepared data set (``manifest.json``'s ``meta.train_ids``, e.g. the
80 of ``skullrec prepare --eval-fraction 0.2 --seed 0``; its evaluation skulls are never read) and
every defect kind:

* ``skullfix``: SkullFix's own defective skull (``meta.defective_folder``);
* ``set1`` / ``set2``: the project's defects (:mod:`skullrec.data.defects`, in mm) cut at the native
  grid of the complete skull, seeded by (seed, case, kind);
* the named kinds of :mod:`skullrec.data.defect_kinds` (``vault-round``, ``lateral``, ``bilateral``, ...),
  cut and seeded the same way; its held-out kind (``HELD_OUT_KIND``) only with ``allow_held_out``, so
  it stays unlike training and ``prepare-eval`` can score it as such;

stage 1 (a ``skullrec train`` checkpoint) reconstructs the defective skull exactly as
``skullrec predict`` does, and the box of :mod:`skullrec.inference.stage2` is cut around the true
implant's bounding-box centre shifted by a seeded uniform offset of up to ``jitter_mm`` per axis
(stage 1's localisation error, so the network sees defects off-centre as at inference). A sample
``OUT/CASE_KIND.npz`` holds ``x`` (2 x grid^3 float16: defective crop, stage-1 complete crop) and
``y`` (grid^3 uint8: true implant fraction > 0.5 on the grid) and ``box``; ``OUT/samples.json``
lists them with their parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data.defect_kinds import DEFECT_KINDS, HELD_OUT_KIND, defect_generator
from ..data.layout import implant_of, read_manifest
from ..errors import DefectError, InputError
from ..data.resample import Box
from .box import box_around, crop, network_input, to_grid
from ..io import Volume, atomic_write_text, list_volumes, read_volume
from ..utils import Progress, ordered_process_map, seed_sequence

KINDS: tuple[str, ...] = ("skullfix", "set1", "set2")  # the default
ALL_KINDS: tuple[str, ...] = (*KINDS, *DEFECT_KINDS)  # what --kinds accepts
DEFAULT_JITTER_MM = 10.0
SAMPLES_FILE = "samples.json"


def check_kinds(kinds: tuple[str, ...], *, training: bool, allow_held_out: bool = False) -> tuple[str, ...]:
    """``kinds`` if every name is known and given once; for ``training``, the held-out kind only with ``allow_held_out``."""
    if not kinds:
        raise InputError("--kinds: no defect kind given")
    for k in kinds:
        if k not in ALL_KINDS:
            raise InputError(f"--kinds: unknown kind {k!r} (known: {', '.join(ALL_KINDS)})")
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise InputError(f"--kinds: {', '.join(dup)} given twice")
    if training and HELD_OUT_KIND in kinds and not allow_held_out:
        raise InputError(f"--kinds: {HELD_OUT_KIND!r} is the held-out kind (kept out of training to score defects unlike "
                         "training); give --allow-held-out to train on it anyway")
    return tuple(kinds)


def training_ids(prepared: str | Path) -> tuple[list[str], Path, Path | None]:
    """(train ids, complete folder, defective folder or None) of a prepared real data set."""
    meta = read_manifest(prepared).get("meta", {})
    ids = meta.get("train_ids")
    if not ids:
        raise InputError(f"{prepared}: manifest lists no train_ids (not a data set from skullrec prepare?)")
    complete = meta.get("complete_folder")
    if not complete:
        raise InputError(f"{prepared}: manifest has no complete_folder")
    defective = meta.get("defective_folder")
    return [str(i) for i in ids], Path(complete), None if not defective else Path(defective)


def make_sample(complete: Volume, defective: np.ndarray, stage1_complete: np.ndarray | Callable[[Box], np.ndarray],
                box_mm: float, grid: int, rng: np.random.Generator, jitter_mm: float = DEFAULT_JITTER_MM) -> dict[str, Any]:
    """One training sample: network input ``x``, target ``y`` and the box, for a defective skull on ``complete``'s grid.

    ``stage1_complete``: stage 1's complete skull on that grid, or a function giving its crop for a box
    (:func:`skullrec.inference.predict.stage1_complete_in_box`, what
    :func:`skullrec.inference.samples.build_stage2_data` uses).
    """
    comp = complete.data.astype(bool)
    implant = implant_of(comp, defective)
    bb = np.argwhere(implant)
    if bb.size == 0:
        raise InputError(f"{complete.path}: the defective skull lacks no bone of the complete skull (no implant)")
    centre = (bb.min(0) + bb.max(0)) / 2.0
    shift_mm = rng.uniform(-jitter_mm, jitter_mm, 3)
    centre = centre + shift_mm / np.asarray(complete.spacing)
    box = box_around(centre, complete.spacing, box_mm)
    prior = stage1_complete(box) if callable(stage1_complete) else crop(np.asarray(stage1_complete, dtype=bool), box)
    x = network_input(defective, prior, box, grid)
    implant_crop = crop(implant.astype(np.uint8), box)
    y = to_grid(implant_crop, grid) > 0.5
    inside = int(implant_crop.sum())
    return {"x": x.astype(np.float16), "y": y.astype(np.uint8), "box": box,
            "shift_mm": [round(float(s), 2) for s in shift_mm], "implant_voxels": int(implant.sum()), "implant_in_box": inside}


def defective_of_kind(kind: str, cid: str, complete: Volume, defective_dir: Path | None, files: dict[str, Path], seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The defective skull of case ``cid`` for ``kind``; ``files``: the listing of ``defective_dir`` (made once)."""
    if kind == "skullfix":
        if defective_dir is None:
            raise InputError("kind 'skullfix' needs the manifest's defective_folder")
        if cid not in files:
            raise InputError(f"{defective_dir}: no defective skull for case {cid}")
        d = read_volume(files[cid])
        return d.data.astype(bool) & complete.data.astype(bool), {"defect_source": "given"}
    # Seeded by (seed, case, kind name): the same defect whatever the worker order or the other kinds asked for.
    rng = np.random.default_rng(seed_sequence(seed, cid, kind, "defect"))
    try:
        mask, params = defect_generator(kind)(complete.data.astype(bool), complete.spacing, rng)
    except DefectError as exc:  # the defect functions see arrays, not files: name the file here
        raise InputError(f"{complete.path}: {exc}") from None
    return mask, {"defect_source": kind, "defect": params}


def eval_ids(prepared: str | Path) -> list[str]:
    """The held-out (evaluation) ids of a prepared real data set (``manifest.json``'s ``meta.eval_ids``)."""
    ids = read_manifest(prepared).get("meta", {}).get("eval_ids")
    if not ids:
        raise InputError(f"{prepared}: manifest lists no eval_ids (not a data set from skullrec prepare --eval-fraction > 0?)")
    return [str(i) for i in ids]


def _eval_case(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Write one evaluation skull's complete skull and its defective skull + implant per kind (a worker's job)."""
    from ..io import write_volume

    cid, staging = job["cid"], Path(job["staging"])
    defective_dir = None if job["defective_dir"] is None else Path(job["defective_dir"])
    complete = read_volume(job["complete_file"])
    write_volume(staging / "complete" / f"{cid}.nii.gz", complete)
    out = []
    for kind in job["kinds"]:
        dmask, extra = defective_of_kind(kind, cid, complete, defective_dir, job["defective_files"], job["seed"])
        implant = implant_of(complete.data.astype(bool), dmask)
        write_volume(staging / kind / "defective" / f"{cid}.nii.gz", complete.like(dmask.astype(np.uint8)))
        write_volume(staging / kind / "implant" / f"{cid}.nii.gz", complete.like(implant.astype(np.uint8)))
        out.append({"case_id": cid, "kind": kind, "held_out": kind == HELD_OUT_KIND, "source": str(job["complete_file"]),
                    "implant_voxels": int(implant.sum()),
                    **{k: v for k, v in extra.items() if k != "defect"}})
    return out


def build_native_eval_sets(prepared: str | Path, out: str | Path, *, kinds: tuple[str, ...] = KINDS, seed: int = 0,
                           overwrite: bool = False, progress: Progress | None = None, workers: int = 1,
                           max_cases: int | None = None) -> dict[str, Any]:
    """Defective skulls of the *evaluation* skulls of ``prepared`` at their own grid, for ``predict`` + ``evaluate``.

    Writes ``OUT/complete/CASE.nii.gz`` (the true complete skull) and, per kind,
    ``OUT/KIND/defective/CASE.nii.gz`` and ``OUT/KIND/implant/CASE.nii.gz`` (complete AND NOT
    defective): ``skullfix`` is SkullFix's own defective skull, ``set1`` / ``set2`` and the kinds of
    :mod:`skullrec.data.defect_kinds` the project's defects cut at the native grid exactly as
    ``prepare-implant`` cuts them for the training skulls (seeded by (seed, case, kind)); the held-out
    kind is allowed here (each record says whether its kind is the held-out one). Volumes go back to each file's own grid (:func:`write_volume`),
    so a prediction from ``predict --in OUT/KIND/defective`` pairs with them voxel for voxel.
    Staged and renamed; returns the manifest written as ``OUT/manifest.json``. ``workers``
    processes (at most 4) write skulls in parallel; the files do not depend on it.
    """
    from ..data.layout import check_output_dir, staged_output

    kinds = check_kinds(tuple(kinds), training=False)
    ids = eval_ids(prepared)[:max_cases]  # max_cases: only the first N evaluation skulls
    _, complete_dir, defective_dir = training_ids(prepared)
    complete_files = list_volumes(complete_dir)
    defective_files = list_volumes(defective_dir) if defective_dir is not None and "skullfix" in kinds else {}
    inputs = (prepared, complete_dir, defective_dir)
    check_output_dir(out, overwrite, inputs)
    cases: list[dict[str, Any]] = []
    with staged_output(out, overwrite, inputs) as staging:
        for cid in ids:
            if cid not in complete_files:
                raise InputError(f"{complete_dir}: no complete skull for evaluation case {cid}")
        jobs = [{"cid": cid, "complete_file": complete_files[cid], "defective_dir": defective_dir, "defective_files": defective_files,
                 "kinds": kinds, "seed": seed, "staging": staging} for cid in ids]
        for i, recs in enumerate(ordered_process_map(_eval_case, jobs, workers), 1):
            cases.extend(recs)
            if progress is not None:
                progress(i, len(ids))
        meta = {"command": "skullrec prepare-eval", "prepared": str(prepared), "kinds": list(kinds), "held_out_kind": HELD_OUT_KIND, "seed": seed,
                "eval_ids": ids, "cases": cases}
        atomic_write_text(staging / "manifest.json", json.dumps(meta, indent=1) + "\n")
    return meta


def load_stage2_samples(root: str | Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(samples.json, x (N, 2, g, g, g) float16, y (N, 1, g, g, g) uint8) of a stage-2 data folder.

    Kept as stored (float16 / uint8, 2.5 GB for 240 samples at 128^3 instead of 6 GB in float32);
    the trainer converts one batch at a time.
    """
    root = Path(root)
    meta_file = root / SAMPLES_FILE
    if not meta_file.is_file():
        raise InputError(f"{root}: no {SAMPLES_FILE} (not a folder from skullrec prepare-implant)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_file}: invalid JSON ({exc})") from None
    xs, ys = [], []
    for rec in meta.get("samples", []):
        path = root / rec["file"]
        try:
            # allow_pickle=False: a sample file can only hold plain arrays, never code.
            with np.load(path, allow_pickle=False) as z:
                xs.append(z["x"].astype(np.float16, copy=False))
                ys.append(z["y"].astype(np.uint8, copy=False)[None])
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: unreadable stage-2 sample ({exc})") from None
    if not xs:
        raise InputError(f"{root}: no samples")
    return meta, np.stack(xs), np.stack(ys)
