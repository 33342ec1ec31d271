"""skullrec.io: NIfTI/NRRD round trips keep geometry and values, atomic writes, one-line input errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from skullrec import io
from skullrec.errors import InputError
from skullrec.io import read_volume, write_nifti


def _random_mask(shape=(7, 9, 5), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) > 0.6).astype(np.uint8)


def _oblique_affine() -> np.ndarray:
    # Rotation about z by 20 degrees and a small tilt, anisotropic spacing, non-zero origin.
    a, b = np.deg2rad(20), np.deg2rad(7)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.45, 0.5, 0.7])
    aff[:3, 3] = [-31.5, 12.25, 80.0]
    return aff


def test_nifti_round_trip_keeps_affine_values_and_header(tmp_path: Path) -> None:
    data = _random_mask()
    affine = _oblique_affine()
    hdr = nib.Nifti1Header()
    hdr["descrip"] = b"skullrec test"
    out = write_nifti(tmp_path / "case.nii.gz", data, affine, hdr)
    vol = read_volume(out)
    assert vol.data.dtype == np.uint8
    # The affine points R, A, S: read_volume holds it in the canonical L, P, S order (axes 0 and 1
    # reversed) and remembers the file's own grid.
    np.testing.assert_array_equal(vol.data, data[::-1, ::-1, :])
    np.testing.assert_array_equal(io.to_source_grid(vol.data, vol.source), data)
    np.testing.assert_allclose(vol.source.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, :2], -affine[:3, :2], atol=1e-5)
    np.testing.assert_allclose(vol.affine @ [6, 8, 0, 1], affine @ [0, 0, 0, 1], atol=1e-5)
    assert vol.header["descrip"].tobytes().rstrip(b"\0") == b"skullrec test"
    np.testing.assert_allclose(vol.spacing, [0.45, 0.5, 0.7], atol=1e-6)
    # The file's qform and sform both carry the affine (what 3D Slicer reads).
    img = nib.load(str(out))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    # Uncompressed .nii as well.
    vol2 = read_volume(write_nifti(tmp_path / "case.nii", data, affine))
    np.testing.assert_array_equal(vol2.data, vol.data)
    # write_volume puts it back on the file's own grid, voxel for voxel.
    back = nib.load(str(io.write_volume(tmp_path / "back.nii.gz", vol)))
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)


def test_nrrd_lps_to_ras_matches_simpleitk_physical_points(tmp_path: Path) -> None:
    data = _random_mask((6, 8, 5), seed=1)
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0).astype(np.int32))  # sitk arrays are (z, y, x)
    a = np.deg2rad(25)
    direction = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([1, -1, 1])
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin((12.5, -40.0, 7.25))
    img.SetSpacing((0.45, 0.45, 0.625))
    path = tmp_path / "skull.nrrd"
    sitk.WriteImage(img, str(path), useCompression=True)

    vol = read_volume(path)
    np.testing.assert_array_equal(io.to_source_grid(vol.data, vol.source), data)
    rng = np.random.default_rng(0)
    for idx in [(0, 0, 0), (5, 7, 4)] + [tuple(int(v) for v in rng.integers(0, (6, 8, 5))) for _ in range(5)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        ras = lps * np.array([-1.0, -1.0, 1.0])  # ITK LPS -> NIfTI RAS
        np.testing.assert_allclose((vol.source.affine @ [*idx, 1.0])[:3], ras, atol=1e-9)
        # The canonical voxel at the same physical point holds the same value.
        canon_idx = np.rint(np.linalg.solve(vol.affine, [*ras, 1.0])[:3]).astype(int)
        assert vol.data[tuple(canon_idx)] == img.GetPixel(idx)
    # The NIfTI written from the NRRD describes the same physical points.
    again = read_volume(write_nifti(tmp_path / "skull.nii.gz", vol.data, vol.affine))
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(again.data, vol.data)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "case.nii.gz"
    write_nifti(target, _random_mask(), np.eye(4))
    assert sorted(p.name for p in target.parent.iterdir()) == ["case.nii.gz"]
    before = target.read_bytes()

    def broken_save(img, filename):  # writes half a file, then fails like a full disk would
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.nib, "save", broken_save)
    with pytest.raises(OSError):
        write_nifti(target, _random_mask(seed=3), np.eye(4))
    assert target.read_bytes() == before  # the existing file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["case.nii.gz"]  # no temporary left

    monkeypatch.undo()
    io.atomic_write_text(tmp_path / "out" / "note.txt", "hello")
    assert (tmp_path / "out" / "note.txt").read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["case.nii.gz", "note.txt"]


def _assert_input_error(path: Path, *words: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as err:
        read_volume(path, **kwargs)
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return err.value


def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _assert_input_error(empty, "empty")

    good = write_nifti(tmp_path / "good.nii.gz", _random_mask((20, 20, 20)), np.eye(4))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _assert_input_error(truncated, "truncated")

    # gzip-valid but the NIfTI inside is cut short
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:400]))
    _assert_input_error(short)

    unknown = tmp_path / "skull.mha"
    unknown.write_bytes(b"whatever")
    _assert_input_error(unknown, "unknown file type")

    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.uint8), np.eye(4)), str(four_d))
    _assert_input_error(four_d, "3D")

    nan = tmp_path / "nan.nii.gz"
    arr = np.zeros((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    _assert_input_error(nan, "NaN")

    soft = tmp_path / "soft.nii.gz"
    prob = np.zeros((4, 4, 4), np.float32)
    prob[1:3, 1:3, 1:3] = 0.8
    prob[0, 0, 0] = 0.3
    nib.save(nib.Nifti1Image(prob, np.eye(4)), str(soft))
    _assert_input_error(soft, "--threshold", "0.8")
    fixed = read_volume(soft, threshold=0.5)  # --threshold fixes it
    np.testing.assert_array_equal(fixed.data, (prob > 0.5).astype(np.uint8))
    assert fixed.data.sum() == 8

    not_nrrd = tmp_path / "fake.nrrd"
    not_nrrd.write_bytes(b"this is not a nrrd file")
    _assert_input_error(not_nrrd, "NRRD")

    _assert_input_error(tmp_path / "missing.nii.gz", "no such file")


def test_list_volumes_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no volume files"):
        io.list_volumes(tmp_path)
    write_nifti(tmp_path / "001.nii.gz", _random_mask(), np.eye(4))
    write_nifti(tmp_path / "001.nii", _random_mask(), np.eye(4))
    with pytest.raises(InputError, match="001"):
        io.list_volumes(tmp_path)
    (tmp_path / "001.nii").unlink()
    (tmp_path / "notes.txt").write_text("ignored")
    assert io.list_volumes(tmp_path) == {"001": tmp_path / "001.nii.gz"}
