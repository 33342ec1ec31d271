"""The on-disk data-set layout shared by synthetic and real skulls, and its manifest.

Layout (every volume uint8 NIfTI, the same affine for the three files of a case)::

    ROOT/
      manifest.json                  # one record per case: split, id, source, seed, defect parameters
      train/{complete,defective,implant}/CASE.nii.gz
      eval_set1/{complete,defective,implant}/CASE.nii.gz   # defects like training (SkullFix-like)
      eval_set2/{complete,defective,implant}/CASE.nii.gz   # other defect shapes, sizes and positions
      [other splits, e.g. eval_skullfix for SkullFix's own defects]

``implant = complete AND NOT defective`` exactly; :func:`write_case` derives it, never takes it.
A whole data set is written into a staging folder and moved into place at the end
(:func:`staged_output`), so an interrupted run never leaves a half-written ROOT behind and an
existing ROOT is only replaced when the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..guards import check_outside_inputs  # the one output-path rule (re-exported: callers import it from here too)
from ..io import (
    Volume, affine_spacing, atomic_write_text, case_id, exclusive_lock, json_default, list_volumes, make_public_dir,
    read_volume, release_lock, write_nifti,
)

# Warnings from domain code go through logging (printed as their bare message on stderr unless the caller configures logging).
log = logging.getLogger("skullrec")

SPLITS = ("train", "eval_set1", "eval_set2")
KINDS = ("complete", "defective", "implant")
MANIFEST = "manifest.json"


@dataclass
class Split:
    """All cases of one split, stacked.

    Attributes:
        ids: case ids, length N.
        defective: (N, X, Y, Z) uint8.
        complete: (N, X, Y, Z) uint8.
        affines: (N, 4, 4) float64.
    """

    ids: list[str]
    defective: np.ndarray
    complete: np.ndarray
    affines: np.ndarray

    @property
    def spacings(self) -> list[tuple[float, float, float]]:
        """Voxel size in mm of each case (from its affine)."""
        return [affine_spacing(a) for a in self.affines]

    @property
    def implant(self) -> np.ndarray:
        """(N, S, S, S) uint8 implants of the split (:func:`implant_of`)."""
        return implant_of(self.complete, self.defective).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.ids)


def case_path(root: str | Path, split: str, kind: str, cid: str) -> Path:
    """Path of one volume in the layout."""
    return Path(root) / split / kind / f"{cid}.nii.gz"


def implant_of(complete: np.ndarray, defective: np.ndarray) -> np.ndarray:
    """The implant: complete AND NOT defective (bool), the one rule of the layout, predictions and scores alike."""
    return np.asarray(complete).astype(bool) & ~np.asarray(defective).astype(bool)


def write_case(
    root: str | Path,
    split: str,
    cid: str,
    complete: np.ndarray,
    defective: np.ndarray,
    affine: np.ndarray,
    header: Any = None,
) -> dict[str, int]:
    """Write complete, defective and implant (= complete AND NOT defective) of one case.

    Returns voxel counts for the manifest. Raises ValueError if the defective skull has bone
    outside the complete skull or a different shape (a programming error, not a user one).
    """
    complete = np.asarray(complete).astype(bool)
    defective = np.asarray(defective).astype(bool)
    if complete.shape != defective.shape:
        raise ValueError(f"case {cid}: complete {complete.shape} and defective {defective.shape} differ in shape")
    implant = implant_of(complete, defective)
    for kind, arr in (("complete", complete), ("defective", defective), ("implant", implant)):
        write_nifti(case_path(root, split, kind, cid), arr, affine, header)
    return {
        "complete_voxels": int(complete.sum()),
        "defective_voxels": int(defective.sum()),
        "implant_voxels": int(implant.sum()),
    }


def write_manifest(root: str | Path, records: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    """Write ``ROOT/manifest.json`` atomically: ``{"meta": {...}, "cases": [...]}``."""
    path = Path(root) / MANIFEST
    payload = {"meta": meta or {}, "cases": records}
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False, default=json_default) + "\n")
    return path


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``ROOT/manifest.json`` (InputError if missing or malformed)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: no manifest; is {root} a skullrec data set?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON ({exc})") from None


def splits_in(root: str | Path) -> list[str]:
    """Splits present under ROOT (folders holding a ``defective`` sub-folder), standard ones first."""
    root = Path(root)
    found = [p.name for p in sorted(root.iterdir()) if (p / "defective").is_dir()] if root.is_dir() else []
    return [s for s in SPLITS if s in found] + [s for s in found if s not in SPLITS]


def load_split(root: str | Path, split: str, max_cases: int | None = None) -> Split:
    """Load one split of a data set into memory (InputError if missing, unpaired or inconsistent)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise InputError(f"{folder}: split '{split}' not found in data set {root}")
    defective_files = list_volumes(folder / "defective")
    complete_files = list_volumes(folder / "complete")
    missing = sorted(set(defective_files) ^ set(complete_files))
    if missing:
        raise InputError(f"{folder}: case '{missing[0]}' lacks its complete or defective partner")
    ids = list(defective_files)[: max_cases or None]
    defective, complete, affines = [], [], []
    for cid in ids:
        d = read_volume(defective_files[cid])
        c = read_volume(complete_files[cid])
        if d.shape != c.shape:
            raise InputError(f"{defective_files[cid]}: shape {d.shape} differs from its complete skull {c.shape}")
        defective.append(d.data)
        complete.append(c.data)
        affines.append(c.affine)
    shapes = {a.shape for a in defective}
    if len(shapes) > 1:
        raise InputError(f"{folder}: cases have different shapes {sorted(shapes)}; run 'skullrec prepare' first")
    return Split(ids=ids, defective=np.stack(defective), complete=np.stack(complete), affines=np.stack(affines))


def check_output_dir(root: str | Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Refuse an output folder that overlaps an input (whatever ``overwrite``) or already holds files.

    Replacing an output removes the old folder, so an output that is, contains or lies inside
    one of ``inputs`` (files or folders, symlinks resolved, :mod:`skullrec.guards`) would delete
    (or hide) the inputs; that is refused even with --overwrite.
    """
    root = Path(root)
    check_outside_inputs(root, inputs)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise InputError(f"{root}: output folder is not empty; pass --overwrite to replace its contents")
    return root


def _lock_path(root: Path) -> Path:
    return root.parent / f".{root.name}.lock"


def stale_staging(root: str | Path) -> list[Path]:
    """Leftovers of runs into ``root`` that died (kill -9, power loss): ``.NAME.staging-*`` and ``.NAME.old-*`` beside it.

    Symlinks of those names are listed too (an older skullrec renamed a symlinked ``--out`` itself away).
    """
    root = Path(root)
    if not root.parent.is_dir():
        return []
    return sorted(p for p in root.parent.iterdir()
                  if p.name.startswith((f".{root.name}.staging-", f".{root.name}.old-")) and (p.is_symlink() or p.is_dir()))


def _remove_stale(old: Path) -> None:
    """Remove one leftover of :func:`stale_staging` and say what was removed (only what was)."""
    if old.is_symlink():
        target = os.readlink(old)
        old.unlink(missing_ok=True)
        log.warning(f"warning: {old}: removed a leftover link of an earlier run (its target {target} is untouched)")
        return
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        log.warning(f"warning: {old}: partial output of an earlier run that did not finish; could not remove it")
    else:
        log.warning(f"warning: {old}: removed the partial output of an earlier run that did not finish")


def real_output(root: str | Path) -> Path:
    """Where an output folder's results go: ``root`` itself, or the target of a symlinked ``root``.

    A symlinked ``--out`` (e.g. to a larger disk) keeps its link: the results replace the contents
    of the link's target. Renaming the link itself away would make ``root`` a real folder here and
    leave the target as it was.
    """
    root = Path(root)
    return root.resolve() if root.is_symlink() else root


@contextlib.contextmanager
def staged_output(root: str | Path, overwrite: bool = False, inputs: Sequence[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``root``; on success it replaces ``root`` in one rename.

    One writer at a time: a lock file ``.NAME.lock`` beside ``root`` (fcntl, released when the
    process ends, even by kill -9) refuses a second writer of the same output with one line.
    Holding the lock, staging folders left by dead runs are removed (and reported: they are
    only partial outputs). On error (or Ctrl-C) the staging folder is deleted and an existing
    ``root`` is untouched. The output gets the user's umask (mkdtemp alone would make it 0700).
    A symlinked ``root`` stays a link: staging, lock and rename happen beside its target
    (:func:`real_output`), whose contents the results replace.
    """
    given = check_output_dir(root, overwrite, inputs)
    root = real_output(given)
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = _lock_path(root)
    lock = exclusive_lock(lock_path, f"{given}: another skullrec command is writing this output folder; wait for it or stop it first")
    try:
        # Checked again under the lock: another writer may have finished into it meanwhile.
        check_output_dir(given, overwrite, inputs)
        for old in stale_staging(root) + (stale_staging(given) if given != root else []):
            _remove_stale(old)
        staging = make_public_dir(tempfile.mkdtemp(prefix=f".{root.name}.staging-", dir=root.parent))
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{staging.name.rsplit('-', 1)[-1]}"
            root.rename(old)
        staging.rename(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        release_lock(lock, lock_path)


__all__ = [
    "SPLITS",
    "KINDS",
    "MANIFEST",
    "Split",
    "Volume",
    "case_id",
    "case_path",
    "write_case",
    "write_manifest",
    "read_manifest",
    "splits_in",
    "load_split",
    "check_output_dir",
    "check_outside_inputs",
    "real_output",
    "stale_staging",
    "staged_output",
]
