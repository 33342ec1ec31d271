"""Stage-2 training samples made with a stage-1 model (``skullrec prepare-implant``).

The samples themselves (what a sample is, the defect kinds, the box) are data-stage code
(:mod:`skullrec.data.stage2`); building them needs stage 1 to reconstruct every defective skull exactly
as ``skullrec predict`` does (:func:`skullrec.inference.predict.stage1_complete_in_box`), so the building
lives here, above both the data and the networks, and no data module imports inference.
"""

from __future__ import annotations

import functools
import io as _stdio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data.defect_kinds import HELD_OUT_KIND
from ..data.layout import check_output_dir, staged_output
from ..data.stage2 import DEFAULT_JITTER_MM, KINDS, SAMPLES_FILE, check_kinds, defective_of_kind, make_sample, training_ids
from ..errors import InputError
from ..io import atomic_write_bytes, atomic_write_text, list_volumes, read_volume
from ..nets.checkpoint import load_checkpoint
from ..utils import Progress, ordered_process_map, seed_sequence
from .predict import stage1_complete_in_box


def _case_samples(job: dict[str, Any]) -> list[tuple[str, bytes, dict[str, Any]]]:
    """All samples of one training skull: (file name, .npz bytes, record) per kind (a worker's job)."""
    model, cfg, _ = load_checkpoint(job["stage1"], "cpu")  # per job: a few MB, negligible beside the skull
    cid, seed = job["cid"], job["seed"]
    defective_dir = None if job["defective_dir"] is None else Path(job["defective_dir"])
    complete = read_volume(job["complete_file"])
    out = []
    for kind in job["kinds"]:
        dmask, extra = defective_of_kind(kind, cid, complete, defective_dir, job["defective_files"], seed)
        dvol = complete.like(dmask.astype(np.uint8))
        rng = np.random.default_rng(seed_sequence(seed, cid, kind, "box"))
        prior = functools.partial(stage1_complete_in_box, model, dvol, size=cfg.model.size)
        s = make_sample(complete, dmask, prior, job["box_mm"], job["grid"], rng, job["jitter_mm"])
        name = f"{cid}_{kind}.npz"
        buf = _stdio.BytesIO()
        np.savez_compressed(buf, x=s["x"], y=s["y"], box_lo=np.asarray(s["box"].lo), box_hi=np.asarray(s["box"].hi))
        out.append((name, buf.getvalue(), {
            "file": name, "case_id": cid, "kind": kind, "source": str(job["complete_file"]), "box": s["box"].to_dict(),
            "shift_mm": s["shift_mm"], "implant_voxels": s["implant_voxels"], "implant_in_box": s["implant_in_box"],
            **{k: v for k, v in extra.items() if k != "defect"}}))
    return out


def build_stage2_data(prepared: str | Path, stage1: str | Path, out: str | Path, *, kinds: tuple[str, ...] = KINDS,
                      box_mm: float = 128.0, grid: int = 128, seed: int = 0, jitter_mm: float = DEFAULT_JITTER_MM,
                      max_cases: int | None = None, overwrite: bool = False, progress: Progress | None = None,
                      log: Callable[[str], None] | None = None, workers: int = 1, allow_held_out: bool = False) -> list[dict[str, Any]]:
    """Write stage-2 samples for the training skulls of ``prepared`` into ``out`` (staged, then renamed); returns the records.

    ``workers`` (at most 4) processes build skulls in parallel; the samples and samples.json do not
    depend on it (every random draw is seeded by (seed, case, kind), and records keep the id order).
    The held-out defect kind is refused unless ``allow_held_out``.
    """
    kinds = check_kinds(tuple(kinds), training=True, allow_held_out=allow_held_out)
    ids, complete_dir, defective_dir = training_ids(prepared)
    if max_cases is not None:
        ids = ids[:max_cases]
    complete_files = list_volumes(complete_dir)
    defective_files = list_volumes(defective_dir) if defective_dir is not None and "skullfix" in kinds else {}
    # Replacing out must never delete an input: the prepared set, its source folders or the stage-1 checkpoint.
    inputs = (prepared, complete_dir, defective_dir, Path(stage1))
    check_output_dir(out, overwrite, inputs)
    load_checkpoint(stage1, "cpu")  # a bad checkpoint is one error before any work
    for cid in ids:
        if cid not in complete_files:
            raise InputError(f"{complete_dir}: no complete skull for training case {cid}")
    jobs = [{"cid": cid, "complete_file": complete_files[cid], "defective_dir": defective_dir, "defective_files": defective_files,
             "stage1": str(stage1), "kinds": kinds, "seed": seed, "box_mm": box_mm, "grid": grid, "jitter_mm": jitter_mm}
            for cid in ids]
    records: list[dict[str, Any]] = []
    total = len(ids) * len(kinds)
    with staged_output(out, overwrite, inputs) as staging:
        for samples in ordered_process_map(_case_samples, jobs, workers):
            for name, payload, rec in samples:
                atomic_write_bytes(staging / name, payload)
                records.append(rec)
                if log is not None and rec["implant_in_box"] < rec["implant_voxels"]:
                    log(f"{rec['case_id']} {rec['kind']}: {rec['implant_voxels'] - rec['implant_in_box']} implant voxels outside the box")
                if progress is not None:
                    progress(len(records), total)
        meta = {"prepared": str(prepared), "stage1": str(stage1), "kinds": list(kinds), "held_out_kind": HELD_OUT_KIND,
                "held_out_kind_used": HELD_OUT_KIND in kinds, "box_mm": box_mm, "grid": grid, "seed": seed, "jitter_mm": jitter_mm,
                "train_ids": ids, "samples": records}
        atomic_write_text(staging / SAMPLES_FILE, json.dumps(meta, indent=1) + "\n")
    return records
