"""The data-set layout: implant derivation, split loading, staged (all-or-nothing) output folders."""

from __future__ import annotations

import numpy as np
import pytest

from skullrec.data.layout import load_split, read_manifest, staged_output, write_case, write_manifest
from skullrec.errors import InputError
from skullrec.io import read_volume


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # unit voxels in the canonical L, P, S voxel order


def _pair(rng: np.random.Generator, shape=(12, 10, 8)):
    complete = rng.random(shape) > 0.5
    defective = complete & (rng.random(shape) > 0.3)
    return complete, defective


def test_write_case_implant_is_exactly_complete_and_not_defective(tmp_path):
    rng = np.random.default_rng()
    complete, defective = _pair(rng)
    affine = np.diag([-0.5, -0.7, 1.2, 1.0])  # the layout's canonical L, P, S order
    counts = write_case(tmp_path, "train", "007", complete, defective, affine)
    implant = read_volume(tmp_path / "train" / "implant" / "007.nii.gz")
    np.testing.assert_array_equal(implant.data, (complete & ~defective).astype(np.uint8))
    np.testing.assert_allclose(implant.affine, affine)
    assert counts == {
        "complete_voxels": int(complete.sum()),
        "defective_voxels": int(defective.sum()),
        "implant_voxels": int((complete & ~defective).sum()),
    }


def test_load_split_stacks_cases_and_manifest_round_trips(tmp_path):
    rng = np.random.default_rng()
    pairs = {cid: _pair(rng) for cid in ("a", "b", "c")}
    for cid, (c, d) in pairs.items():
        write_case(tmp_path, "eval_set1", cid, c, d, LPS)
    write_manifest(tmp_path, [{"split": "eval_set1", "case_id": k, "seed": np.int64(3)} for k in pairs], {"source": "test"})
    split = load_split(tmp_path, "eval_set1")
    assert split.ids == ["a", "b", "c"]
    assert split.defective.shape == (3, 12, 10, 8) and split.defective.dtype == np.uint8
    np.testing.assert_array_equal(split.implant[1], (pairs["b"][0] & ~pairs["b"][1]).astype(np.uint8))
    assert read_manifest(tmp_path)["cases"][2] == {"split": "eval_set1", "case_id": "c", "seed": 3}
    assert len(load_split(tmp_path, "eval_set1", max_cases=2)) == 2


def test_load_split_reports_missing_partner(tmp_path):
    rng = np.random.default_rng()
    write_case(tmp_path, "train", "a", *_pair(rng), np.eye(4))
    (tmp_path / "train" / "complete" / "a.nii.gz").unlink()
    write_case(tmp_path, "train", "b", *_pair(rng), np.eye(4))
    with pytest.raises(InputError, match="'a' lacks its complete or defective partner"):
        load_split(tmp_path, "train")


def test_staged_output_refuses_existing_results_and_keeps_them_on_failure(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "old.txt").write_text("precious")
    with pytest.raises(InputError, match="is not empty; pass --overwrite"):
        with staged_output(root):
            pass
    with pytest.raises(RuntimeError):
        with staged_output(root, overwrite=True) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (root / "old.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging folder left behind
    with staged_output(root, overwrite=True) as staging:
        (staging / "new.txt").write_text("complete")
    assert sorted(p.name for p in root.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
