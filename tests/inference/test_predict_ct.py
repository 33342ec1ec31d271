"""``skullrec predict`` on CT input: DICOM series folders and NIfTI CTs in HU (--ct), outputs on the CT's grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ct_helpers import UID_ROOT, ct_from_skull, defective_shell, rotation, write_dicom_series
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.data.ct import read_ct_skull
from skullrec.io import read_volume, write_nifti

SIZE = 32


def _skull() -> np.ndarray:
    """An ellipsoidal shell with a cap removed (the defect), 2-3 voxels thick."""
    return defective_shell((46, 40, 34), (20, 17, 14), 0.86, np.s_[14:32, 12:28, 24:])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skullrec.config import config_from_dict
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    cfg = config_from_dict({"model": {"size": SIZE, "channels": [2, 2, 2, 2, 2]}})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", build_model(cfg.model, seed=0), cfg, epoch=0)


def _run(*args: str) -> object:
    return CliRunner().invoke(app, ["predict", *args, "--device", "cpu"])


def test_predict_on_dicom_ct_series_writes_results_on_the_ct_grid(tmp_path: Path, tiny_checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    skull = _skull()
    # Two patients, one series folder each: an oblique series (4 mm voxels, so the shell spans a skull's
    # ~180 mm) and one stored as (HU + 1024) / 2 with rescale slope 2, intercept -1024.
    write_dicom_series(tmp_path / "in" / "oblique", ct_from_skull(skull, rng), (4.0, 4.2, 4.5),
                       rotation("x", 18) @ rotation("y", -7), (-90.0, -80.0, -60.0), uid=UID_ROOT + ".1")
    hu2 = (2 * ((ct_from_skull(skull, rng).astype(np.int32) + 1024) // 2) - 1024).astype(np.int16)
    write_dicom_series(tmp_path / "in" / "scaled", hu2, (4.0, 4.0, 4.0), slope=2, intercept=-1024, uid=UID_ROOT + ".2")
    out = tmp_path / "out"
    res = _run("--checkpoint", str(tiny_checkpoint), "--in", str(tmp_path / "in"), "--out", str(out), "--ct")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "predict.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == ["oblique", "scaled"] and report["ct"] == {"bone_hu": 300.0}
    for cid in ("oblique", "scaled"):
        ct = read_volume(tmp_path / "in" / cid, mask=False)
        mask, info = read_ct_skull(tmp_path / "in" / cid)
        assert report["cases"][[c["case_id"] for c in report["cases"]].index(cid)]["ct"] == info
        for kind in ("complete", "implant", "ct_mask"):
            path = out / kind / f"{cid}.nii.gz"
            # On the CT's own grid: the file's shape and affine are those of the DICOM series as stored ...
            img = nib.load(str(path))
            assert img.shape == ct.source.shape
            np.testing.assert_allclose(img.affine, ct.source.affine, atol=1e-4)
            # ... and read back through the canonical path it lines up with the CT voxel for voxel.
            v = read_volume(path)
            assert v.shape == ct.shape
            np.testing.assert_allclose(v.affine, ct.affine, atol=1e-4)
        np.testing.assert_array_equal(read_volume(out / "ct_mask" / f"{cid}.nii.gz").data, mask.data)
        assert abs(2 * (mask.data.astype(bool) & _canonical(skull, ct)).sum() / (mask.data.sum() + skull.sum()) - 1) < 0.05


def _canonical(skull: np.ndarray, ct) -> np.ndarray:
    """``skull`` (in the series' stored order) in the CT volume's canonical order."""
    from skullrec.io import to_canonical

    return to_canonical(skull, ct.source.affine)[0]


def test_predict_series_flag_picks_one_of_several(tmp_path: Path, tiny_checkpoint: Path) -> None:
    rng = np.random.default_rng(1)
    skull = _skull()
    write_dicom_series(tmp_path / "two", ct_from_skull(skull, rng), (4.0, 4.0, 4.0), uid=UID_ROOT + ".5", description="head")
    write_dicom_series(tmp_path / "b", ct_from_skull(skull[::-1], rng)[:, :, :20], (4.0, 4.0, 4.0), uid=UID_ROOT + ".6")
    for p in sorted((tmp_path / "b").iterdir()):
        p.rename(tmp_path / "two" / f"b_{p.name}")
    args = ["--checkpoint", str(tiny_checkpoint), "--in", str(tmp_path / "two"), "--ct"]
    res = _run(*args, "--out", str(tmp_path / "o1"))
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "2 DICOM series in this folder; choose one with --series UID" in res.stderr
    assert f"{UID_ROOT}.5 (34 slices, head)" in res.stderr and f"{UID_ROOT}.6 (20 slices" in res.stderr
    assert not (tmp_path / "o1").exists()
    res = _run(*args, "--out", str(tmp_path / "o2"), "--series", f"{UID_ROOT}.5")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o2" / "predict.json").read_text())
    assert report["series"] == [f"{UID_ROOT}.5"] and [c["case_id"] for c in report["cases"]] == ["two"]
    assert nib.load(str(tmp_path / "o2" / "complete" / "two.nii.gz")).shape == skull.shape  # the 34-slice series


def test_predict_ct_from_a_nifti_in_hu(tmp_path: Path, tiny_checkpoint: Path) -> None:
    rng = np.random.default_rng(2)
    skull = _skull()
    aff = np.diag([-4.0, -4.0, 4.0, 1.0])
    write_nifti(tmp_path / "in" / "p1.nii.gz", ct_from_skull(skull, rng), aff, dtype=np.int16)
    out = tmp_path / "out"
    res = _run("--checkpoint", str(tiny_checkpoint), "--in", str(tmp_path / "in"), "--out", str(out), "--ct", "--bone-hu", "500")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read_volume(out / "ct_mask" / "p1.nii.gz").data, skull)
    assert json.loads((out / "predict.json").read_text())["cases"][0]["ct"]["bone_hu"] == 500.0
