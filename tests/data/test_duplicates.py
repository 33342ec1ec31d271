"""prepare leaves a held-out skull out when it is voxel-identical to a training skull (SkullFix's 052 is 000)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from skullrec.data.build import build_dataset, duplicate_skulls, mask_digest, split_cases
from skullrec.data.synth import generate_skull


def _skull(seed: int) -> np.ndarray:
    return generate_skull(seed, (48, 48, 48), (4.0, 4.0, 4.0))[0].astype(np.uint8)


def test_mask_digest_sees_voxels_not_headers_or_dtype() -> None:
    a = _skull(0)
    assert mask_digest(a) == mask_digest(a.astype(np.float32)) == mask_digest(a.astype(bool))
    b = a.copy()
    b[tuple(np.argwhere(a)[0])] = 0  # one voxel less
    assert mask_digest(b) != mask_digest(a)
    assert mask_digest(a.reshape(48, 96, 24)) != mask_digest(a)  # same bits, other shape


def test_duplicate_skulls_prefers_training_copies_then_the_lowest_id() -> None:
    recs = [{"case_id": c, "complete_sha256": h} for c, h in
            [("000", "x"), ("001", "y"), ("052", "x"), ("060", "y"), ("061", "y"), ("070", "z")]]
    assert duplicate_skulls(recs, train_ids=["000"], eval_ids=["001", "052", "060", "061", "070"]) == {
        "052": "000", "060": "001", "061": "001"}
    assert duplicate_skulls(recs, train_ids=["000", "052"], eval_ids=["070"]) == {}


def test_prepare_leaves_a_held_out_copy_of_a_training_skull_out(tmp_path: Path) -> None:
    src = tmp_path / "complete"
    src.mkdir()
    aff = np.diag([-4.0, -4.0, 4.0, 1.0])
    skulls = {"000": _skull(0), "001": _skull(1), "002": _skull(2), "003": _skull(3)}
    for cid, s in skulls.items():
        img = nib.Nifti1Image(s, aff)
        nib.save(img, str(src / f"{cid}.nii.gz"))
    copy = nib.Nifti1Image(skulls["000"], aff)
    copy.header["descrip"] = b"another scan date"  # only the header differs, as for SkullFix 052 and 000
    nib.save(copy, str(src / "052.nii.gz"))
    ids = ["000", "001", "002", "003", "052"]
    # a seed whose split holds 000 for training and its copy 052 out
    seed = next(s for s in range(200) if "000" in split_cases(ids, 0.4, s)[0] and "052" in split_cases(ids, 0.4, s)[1])
    train_ids, eval_ids = split_cases(ids, 0.4, seed)
    warnings: list[str] = []
    built = build_dataset(complete=src, out=tmp_path / "ds", size=32, eval_fraction=0.4, seed=seed, workers=1, warn=warnings.append)
    assert len(warnings) == 1 and "052.nii.gz" in warnings[0] and "000.nii.gz" in warnings[0]
    meta = json.loads((tmp_path / "ds" / "manifest.json").read_text())["meta"]
    assert meta["duplicates_left_out"] == {"052": "000"}
    assert meta["eval_ids"] == [c for c in eval_ids if c != "052"] and meta["train_ids"] == train_ids
    assert "052" not in built.ids and all(r["case_id"] != "052" for r in built.records)
    assert not list((tmp_path / "ds").rglob("052.nii.gz"))
    other = [c for c in eval_ids if c != "052"]
    for split in ("eval_set1", "eval_set2"):
        assert sorted(p.name for p in (tmp_path / "ds" / split / "complete").iterdir()) == [f"{c}.nii.gz" for c in other]
