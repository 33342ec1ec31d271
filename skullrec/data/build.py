"""``skullrec prepare``: a folder of real skulls -> a data set in the layout of :mod:`skullrec.data.layout`.

Each case is read, its defects are cut on the source grid (set 1 and set 2 for evaluation cases, set 1
for training cases, unless defective skulls are given) and every output is prepared with
:func:`skullrec.data.resample.prepare_pair`. Cases run in worker processes; seeds depend on the case id,
not on the order in which workers finish.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..io import Volume, list_volumes
from ..utils import Progress, seed_key, seed_sequence
from .layout import case_path, check_output_dir, implant_of, staged_output, write_manifest
from .resample import BONE_FRACTION, DEFAULT_MARGIN_MM, DEFAULT_SIZE, bone_box, prepare_pair

SKULLFIX_SPLIT = "eval_skullfix"  # SkullFix's own defective skulls of the evaluation cases


def case_seed(seed: int, cid: str, stream: int) -> list[int]:
    """Seed entropy for one case's defect: independent of the order in which workers run cases."""
    return [seed_key(seed), seed_key(cid), seed_key(stream)]  # the one scheme of skullrec.utils: a case id enters as its CRC-32


def _prepare_case(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Read one case, cut its defects on the source grid, prepare and write every split it belongs to."""
    from ..errors import DefectError

    try:
        return _prepare_case_unchecked(job)
    except DefectError as exc:
        # The defect functions see arrays, not files: name the file here.
        raise InputError(f"{job['complete']}: {exc}") from None


def _prepare_case_unchecked(job: dict[str, Any]) -> list[dict[str, Any]]:
    from ..io import read_volume
    from .layout import write_case

    cid, root, size, margin = job["cid"], Path(job["root"]), job["size"], job["margin_mm"]
    complete = read_volume(job["complete"], threshold=job["threshold"])
    if not complete.data.any():
        raise InputError(f"{job['complete']}: no bone voxels (empty mask)")
    given = None
    if job["defective"] is not None:
        given = read_volume(job["defective"], threshold=job["threshold"])
        if given.shape != complete.shape:
            raise InputError(f"{job['defective']}: shape {given.shape} differs from its complete skull {complete.shape}")
        if not np.allclose(given.affine, complete.affine, atol=1e-3):
            raise InputError(f"{job['defective']}: voxel-to-world affine differs from its complete skull's")
        if not given.data.any():
            raise InputError(f"{job['defective']}: no bone voxels (empty mask)")

    digest = mask_digest(complete.data)
    # (split, defective source volume, defect description) for every output of this case
    outputs: list[tuple[str, Volume, dict[str, Any]]] = []
    if job["eval"]:
        from .defects import set1_defect, set2_defect

        for split, fn, stream in (("eval_set1", set1_defect, 1), ("eval_set2", set2_defect, 2)):
            s = case_seed(job["seed"], cid, stream)
            dmask, params = fn(complete.data.astype(bool), complete.spacing, np.random.default_rng(seed_sequence(*s)))
            outputs.append((split, Volume(dmask.astype(np.uint8), complete.affine, path=complete.path),
                            {"defect": params, "defect_seed": s, "defect_source": split}))
        if given is not None:
            outputs.append((SKULLFIX_SPLIT, given, {"defect_source": "given", "defective_source": str(job["defective"])}))
    elif given is not None:
        outputs.append(("train", given, {"defect_source": "given", "defective_source": str(job["defective"])}))
    else:
        from .defects import set1_defect

        s = case_seed(job["seed"], cid, 1)
        dmask, params = set1_defect(complete.data.astype(bool), complete.spacing, np.random.default_rng(seed_sequence(*s)))
        outputs.append(("train", Volume(dmask.astype(np.uint8), complete.affine, path=complete.path),
                        {"defect": params, "defect_seed": s, "defect_source": "set1"}))

    records = []
    for split, defective, extra in outputs:
        c64, d64 = prepare_pair(complete, defective, size, margin)
        box = bone_box(defective, margin)
        counts = write_case(root, split, cid, c64.data, d64.data, c64.affine)
        source_implant = int(implant_of(complete.data, defective.data).sum())
        # Complete-skull bone outside the defective-based box is lost from the prepared complete skull.
        inside = int(complete.data[tuple(slice(max(lo, 0), max(hi, 0)) for lo, hi in zip(box.lo, box.hi))].astype(bool).sum())
        records.append({
            "split": split,
            "case_id": cid,
            "source": str(job["complete"]),
            "seed": int(job["seed"]),
            **extra,
            "complete_sha256": digest,
            "source_shape": list(complete.shape),
            "source_spacing": [round(s, 6) for s in complete.spacing],
            "box": box.to_dict(),
            "spacing": [round(s, 6) for s in c64.spacing],
            "source_implant_voxels": source_implant,
            "source_implant_fraction": source_implant / int(complete.data.astype(bool).sum()),
            "complete_bone_outside_box": int(complete.data.astype(bool).sum()) - inside,
            **counts,
        })
    return records


def mask_digest(mask: np.ndarray) -> str:
    """SHA-256 of a mask's shape and bits in canonical order: equal for voxel-identical skulls whatever their headers say."""
    m = np.ascontiguousarray(np.asarray(mask).astype(bool))
    h = hashlib.sha256(repr(m.shape).encode())
    h.update(np.packbits(m, axis=None).tobytes())
    return h.hexdigest()


def duplicate_skulls(records: list[dict[str, Any]], train_ids: list[str], eval_ids: list[str]) -> dict[str, str]:
    """Evaluation cases whose complete skull is voxel-identical to another case's: {duplicate: the case it copies}.

    An evaluation skull that copies a training skull was seen in training, so it cannot be held out
    (SkullFix's 052 is 000 again); of two identical evaluation skulls the first id stays.
    """
    digest = {r["case_id"]: r["complete_sha256"] for r in records}
    first: dict[str, str] = {}
    for cid in sorted(train_ids) + sorted(eval_ids):  # training copies win, then the lowest id
        first.setdefault(digest[cid], cid)
    return {cid: first[digest[cid]] for cid in sorted(eval_ids) if first[digest[cid]] != cid}


def split_cases(ids: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train / eval split of case ids: (train ids, eval ids), both sorted.

    ``eval_fraction`` 0 puts every case in train, 1 every case in the evaluation sets (an
    evaluation-only data set); in between, at least one case lands on each side.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise InputError(f"--eval-fraction: must be in [0, 1], got {eval_fraction}")
    n_eval = int(round(eval_fraction * len(ids)))
    if 0.0 < eval_fraction < 1.0 and len(ids) >= 2:
        n_eval = min(max(n_eval, 1), len(ids) - 1)  # keep at least one case on each side
    order = np.random.default_rng(seed_sequence(seed, 0x5EED)).permutation(len(ids))
    eval_ids = sorted(ids[i] for i in order[:n_eval])
    return sorted(set(ids) - set(eval_ids)), eval_ids


SPLIT_ORDER = ("train", "eval_set1", "eval_set2", SKULLFIX_SPLIT)


@dataclass
class Built:
    """A data set written by :func:`build_dataset`: its folder, the case ids used and the manifest records."""

    out: Path
    ids: list[str]
    records: list[dict[str, Any]]


def build_dataset(
    complete: Path,
    out: Path,
    defective: Path | None = None,
    size: int = DEFAULT_SIZE,
    margin_mm: float = DEFAULT_MARGIN_MM,
    eval_fraction: float = 0.2,
    seed: int = 0,
    threshold: float | None = None,
    max_cases: int | None = None,
    overwrite: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> Built:
    """Prepare a folder of complete skulls (+ optional defective partners) as a ``size^3`` data set at ``out``.

    Splits (seeded): train = complete + the given defective skull (or a set-1 defect when none is
    given); eval_set1 / eval_set2 = set-1 / set-2 defects cut at full resolution on the held-out
    skulls; eval_skullfix = the given defective skulls of the held-out cases. ``progress(done, total)``
    is called after each case. An evaluation skull voxel-identical to a training skull (or to an earlier
    evaluation skull) is left out of every evaluation split, with a ``warn`` line and the pair recorded in
    the manifest (``meta.duplicates_left_out``); identical training skulls are only warned about.
    """
    inputs = (complete, defective)  # replacing the output must never delete an input
    check_output_dir(out, overwrite, inputs)  # fail before the slow part
    cfiles = list_volumes(complete)
    dfiles = list_volumes(defective) if defective is not None else {}
    if defective is not None:
        for cid, path in cfiles.items():
            if cid not in dfiles:
                raise InputError(f"{path}: no defective partner '{cid}' in {defective}")
        for cid, path in dfiles.items():
            if cid not in cfiles:
                raise InputError(f"{path}: no complete partner '{cid}' in {complete}")
    ids = list(cfiles)[:max_cases]
    train_ids, eval_ids = split_cases(ids, eval_fraction, seed)
    report = progress or (lambda done, total: None)

    with staged_output(out, overwrite, inputs) as staging:
        jobs = [
            {
                "cid": cid, "root": str(staging), "size": size, "margin_mm": margin_mm, "seed": seed,
                "threshold": threshold, "complete": str(cfiles[cid]),
                "defective": str(dfiles[cid]) if cid in dfiles else None, "eval": cid in eval_ids,
            }
            for cid in ids
        ]
        records: list[dict[str, Any]] = []
        report(0, len(jobs))
        n_workers = max(1, min(workers, 2, len(jobs)))
        if n_workers == 1:
            for done, job in enumerate(jobs, 1):
                records.extend(_prepare_case(job))
                report(done, len(jobs))
        else:
            # One skull is ~60-130 M voxels; two processes at most keep memory and the shared CPUs sane.
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_prepare_case, job) for job in jobs]
                try:
                    for done, fut in enumerate(as_completed(futures), 1):
                        records.extend(fut.result())
                        report(done, len(jobs))
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        say = warn or (lambda msg: None)
        duplicates = duplicate_skulls(records, train_ids, eval_ids)
        for cid, same in duplicates.items():
            say(f"{cfiles[cid]}: the same skull as {cfiles[same]} (voxel-identical); left out of the evaluation splits")
            for r in records:
                if r["case_id"] == cid:
                    for kind in ("complete", "defective", "implant"):
                        case_path(staging, r["split"], kind, cid).unlink()
        records = [r for r in records if r["case_id"] not in duplicates]
        eval_ids = [c for c in eval_ids if c not in duplicates]
        seen: dict[str, str] = {}
        for r in records:
            if r["split"] == "train" and seen.setdefault(r["complete_sha256"], r["case_id"]) != r["case_id"]:
                say(f"{cfiles[r['case_id']]}: the same skull as {cfiles[seen[r['complete_sha256']]]} (voxel-identical); both train")
        order = {s: i for i, s in enumerate(SPLIT_ORDER)}
        records.sort(key=lambda r: (order.get(r["split"], 9), r["case_id"]))
        meta = {
            "kind": "real",
            "command": "skullrec prepare",
            "complete_folder": str(complete),
            "defective_folder": str(defective) if defective is not None else None,
            "size": size,
            "margin_mm": margin_mm,
            "downsampling": f"partial-volume bone fraction > {BONE_FRACTION} (crop box from the defective skull)",
            "eval_fraction": eval_fraction,
            "seed": seed,
            "threshold": threshold,
            "train_ids": train_ids,
            "eval_ids": eval_ids,
            "duplicates_left_out": duplicates,
        }
        write_manifest(staging, records, meta)
    return Built(Path(out), [c for c in ids if c not in duplicates], records)
