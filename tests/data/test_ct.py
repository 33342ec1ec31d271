"""CT and DICOM input: reading DICOM series (rescale, oblique grids, several series, bad series) and the CT -> skull mask."""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SKULLFIX_TRAINING, shell_pair
from ct_helpers import UID_ROOT, ct_from_skull, rotation, stored_pixels, write_dicom_series

from skullrec import io
from skullrec.data.ct import mask_warnings, read_ct_skull, skull_mask_from_ct
from skullrec.errors import InputError
from skullrec.io import LPS_TO_RAS, affine_spacing, list_volumes, read_volume, to_canonical, write_nifti


def _affine(spacing, direction, origin) -> np.ndarray:
    """The RAS voxel-to-world affine of a series written by write_dicom_series (LPS direction and origin)."""
    aff = np.eye(4)
    aff[:3, :3] = LPS_TO_RAS @ np.asarray(direction) @ np.diag(spacing)
    aff[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return aff


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _skullfix_pair(factor: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """SkullFix case 000 (complete, defective), every ``factor``-th voxel (512^2 x Z -> ~100^2 x Z/5)."""
    pair = []
    for kind in ("complete_skull", "defective_skull"):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SKULLFIX_TRAINING / kind / "000.nrrd"))).transpose(2, 1, 0)
        pair.append(arr[::factor, ::factor, ::factor] > 0)
    return pair[0], pair[1]


def _synthetic_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 3-voxel thick ellipsoidal shell (~100 x 90 x 70) and it with a cap and a small hole cut out (the defects)."""
    shape = (100, 90, 70)
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 45) ** 2 + (g[1] / 40) ** 2 + (g[2] / 31) ** 2)
    complete = (r <= 1) & (r >= 0.92)
    defective = complete.copy()
    defective[30:70, 25:60, 45:] = False
    defective[:10, 42:48, 32:38] = False  # a small hole (6 voxels): a closing of a few voxels would bridge it
    return complete, defective


@pytest.fixture(params=["synthetic", pytest.param("skullfix", marks=pytest.mark.real)])
def skull_pair(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    if request.param == "skullfix":
        if not (SKULLFIX_TRAINING / "defective_skull" / "000.nrrd").is_file():
            pytest.skip("SkullFix data (../shared) not available")
        return _skullfix_pair()
    return _synthetic_pair()


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 1500, (20, 24, 6))
    hu = (2 * stored - 1024).astype(np.int16)  # the file holds (HU + 1024) / 2: slope 2, intercept -1024
    files = write_dicom_series(tmp_path / "s", hu, (0.8, 0.9, 1.5), slope=2, intercept=-1024)
    for k in (0, 5):  # the pixels on disk are the stored values, not HU ...
        np.testing.assert_array_equal(stored_pixels(files[k], (20, 24)), stored[:, :, k])
    encoding = locale.getpreferredencoding(False)
    vol = read_volume(tmp_path / "s", mask=False)
    assert locale.getpreferredencoding(False) == encoding  # reading leaves the process locale alone (GDCM's writer does not)
    # ... and reading gives HU (identity LPS direction is already the canonical L, P, S order).
    np.testing.assert_array_equal(vol.data, hu)
    np.testing.assert_allclose(vol.affine, _affine((0.8, 0.9, 1.5), np.eye(3), (0, 0, 0)), atol=1e-6)
    assert vol.source.is_canonical and vol.header is None and vol.path == tmp_path / "s"


def test_oblique_series_keeps_its_tilt_like_an_oblique_nifti(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    hu = rng.integers(-1000, 1500, (18, 14, 10)).astype(np.int16)
    # Tilted 20 degrees about x and 8 about z, and axes 0 and 1 stored flipped (a non-canonical order;
    # DICOM's slice normal is row x column, so a proper rotation: the determinant stays +1).
    direction = rotation("x", 20) @ rotation("z", 8) @ np.diag([-1.0, -1.0, 1.0])
    spacing, origin = (0.7, 1.2, 2.0), (12.5, -30.0, 44.0)
    write_dicom_series(tmp_path / "obl", hu, spacing, direction, origin)
    aff = _affine(spacing, direction, origin)
    vol = read_volume(tmp_path / "obl", mask=False)
    want_data, want_affine, source = to_canonical(hu, aff)
    assert not source.is_canonical  # the flip was undone ...
    np.testing.assert_allclose(vol.affine, want_affine, atol=1e-5)  # ... and the 20-degree tilt kept
    np.testing.assert_array_equal(vol.data, want_data)
    np.testing.assert_allclose(vol.source.affine, aff, atol=1e-5)
    # The same voxels as a NIfTI on the same affine read back identically: DICOM takes the common path.
    write_nifti(tmp_path / "obl.nii.gz", hu, aff, dtype=np.int16)
    nii = read_volume(tmp_path / "obl.nii.gz", mask=False)
    np.testing.assert_array_equal(nii.data, vol.data)
    np.testing.assert_allclose(nii.affine, vol.affine, atol=1e-4)


def test_ct_mask_matches_the_skull_and_leaves_the_defect_open(tmp_path: Path, skull_pair) -> None:
    complete, defective = skull_pair
    rng = np.random.default_rng(3)
    hu = ct_from_skull(defective, rng)
    # Other dense things a head CT holds, apart from the skull: a head holder and metal specks.
    hu[:, :2, :] = 900
    hu[tuple(rng.integers(0, n, 20) for n in hu.shape)] = 2500
    direction = rotation("y", 15)
    spacing = (2.2, 2.2, 2.5)
    write_dicom_series(tmp_path / "ct", hu, spacing, direction, (-100.0, -110.0, -40.0), slope=2, intercept=-1024)
    mask, info = read_ct_skull(tmp_path / "ct")
    want, _, _ = to_canonical(defective.astype(np.uint8), _affine(spacing, direction, (-100.0, -110.0, -40.0)))
    defect, _, _ = to_canonical((complete & ~defective).astype(np.uint8), _affine(spacing, direction, (-100.0, -110.0, -40.0)))
    assert mask.data.dtype == np.uint8 and set(np.unique(mask.data)) == {0, 1}
    assert _dice(mask.data, want) > 0.95, _dice(mask.data, want)
    # The hole stays open: the defect region is (all but) empty in the mask.
    assert mask.data[defect.astype(bool)].mean() < 0.01
    assert info["components"] > 2 and info["kept_voxels"] == int(mask.data.sum())
    np.testing.assert_allclose(mask.affine, read_volume(tmp_path / "ct", mask=False).affine)


def test_largest_piece_is_kept_and_the_rest_reported() -> None:
    rng = np.random.default_rng(4)
    complete, defective = shell_pair(40, rng)
    hu = ct_from_skull(defective, rng).astype(np.float32)
    hu[:4, :4, :4] = 1000.0  # a small separate bone piece
    mask, info = skull_mask_from_ct(hu)
    np.testing.assert_array_equal(mask.astype(bool), defective)
    assert info["components"] == 2 and info["dropped_fraction"] == pytest.approx(64 / (64 + defective.sum()), abs=1e-4)
    assert mask_warnings(info) == []
    hu[:4, :4, :4] = 40.0
    hu[19:21] = 40.0  # a soft-tissue cut splits the skull in two: the smaller half is left out, with a warning
    mask, info = skull_mask_from_ct(hu, 300)
    halves = [defective[:19].sum(), defective[21:].sum()]
    assert info["components"] == 2 and info["kept_voxels"] == max(halves) == mask.sum()
    assert info["dropped_fraction"] == pytest.approx(min(halves) / sum(halves), abs=1e-4) and min(halves) / sum(halves) > 0.2
    assert "outside the largest" in mask_warnings(info)[0]


@pytest.mark.parametrize("values, message", [
    (np.eye(4)[None].repeat(4, 0), "look like a binary mask, not a CT in HU"),
    (np.full((4, 4, 4), -1000.0), "no voxel reaches the bone threshold of 300 HU"),
])
def test_ct_mask_refuses_non_ct_inputs(values: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        skull_mask_from_ct(values)


def _two_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    a = rng.integers(-1000, 1000, (10, 12, 5)).astype(np.int16)
    b = rng.integers(-1000, 1000, (10, 12, 7)).astype(np.int16)
    write_dicom_series(folder, a, uid=UID_ROOT + ".10", description="soft kernel")
    # Written under other file names into the same folder: one folder, two series.
    tmp = folder.parent / "b_tmp"
    for p in write_dicom_series(tmp, b, uid=UID_ROOT + ".20", description="bone kernel"):
        p.rename(folder / f"b_{p.name}")
    tmp.rmdir()
    return a, b


def test_several_series_are_listed_and_series_picks_one(tmp_path: Path) -> None:
    a, b = _two_series(tmp_path / "two")
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "two", mask=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'two'}: 2 DICOM series in this folder; choose one with --series UID")
    assert f"{UID_ROOT}.10 (5 slices, soft kernel)" in msg and f"{UID_ROOT}.20 (7 slices, bone kernel)" in msg
    np.testing.assert_array_equal(read_volume(tmp_path / "two", mask=False, series=f"{UID_ROOT}.20").data, b)
    np.testing.assert_array_equal(read_volume(tmp_path / "two", mask=False, series=[f"{UID_ROOT}.10", "9.9"]).data, a)
    with pytest.raises(InputError, match="choose one with --series"):
        read_volume(tmp_path / "two", mask=False, series="9.9")
    with pytest.raises(InputError, match="--series names 2 of this folder's series"):
        read_volume(tmp_path / "two", mask=False, series=[f"{UID_ROOT}.10", f"{UID_ROOT}.20"])


def test_list_volumes_takes_series_folders_as_cases(tmp_path: Path) -> None:
    hu = np.zeros((6, 6, 3), np.int16)
    write_dicom_series(tmp_path / "cases" / "p01", hu, uid=UID_ROOT + ".1")
    write_dicom_series(tmp_path / "cases" / "p02", hu, uid=UID_ROOT + ".2")
    (tmp_path / "cases" / "notes").mkdir()  # not DICOM: not a case
    (tmp_path / "cases" / "notes" / "readme.txt").write_text("x" * 200)
    write_nifti(tmp_path / "cases" / "p03.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4))
    assert list_volumes(tmp_path / "cases") == {"p01": tmp_path / "cases" / "p01", "p02": tmp_path / "cases" / "p02",
                                                "p03": tmp_path / "cases" / "p03.nii.gz"}
    assert list_volumes(tmp_path / "cases" / "p02") == {"p02": tmp_path / "cases" / "p02"}
    with pytest.raises(InputError, match="no volume files"):
        list_volumes(tmp_path / "cases" / "notes")
    with pytest.raises(InputError, match=r"not a file \(and no DICOM files in this folder\)"):
        read_volume(tmp_path / "cases" / "notes")


def _series(tmp_path: Path, name: str, n: int = 6, **kw) -> Path:
    write_dicom_series(tmp_path / name, np.full((8, 9, n), -1000, np.int16), spacing=(1.0, 1.0, 2.0), **kw)
    return tmp_path / name


def test_irregular_series_are_one_line_errors_naming_the_folder(tmp_path: Path) -> None:
    gap = _series(tmp_path, "gap")
    (gap / "slice0003.dcm").unlink()
    tilt = np.array([[0, 0.0, 2.0 * k] for k in range(6)]) + np.array([[0, 0.5 * k, 0] for k in range(6)])
    cases = {
        gap: "slices are not evenly spaced (2 to 4 mm apart; missing slices?)",
        _series(tmp_path, "tilt", positions=tilt): "drift sideways by up to 2.5 mm along the stack (gantry tilt)",
        _series(tmp_path, "dup", positions=np.array([[0, 0, 2.0 * (k // 2)] for k in range(6)])): "two slices at the same position",
    }
    mixed = _series(tmp_path, "mixed")
    write_dicom_series(tmp_path / "other", np.zeros((5, 9, 1), np.int16), origin=(0, 0, 12.0))  # same UID, other size
    (tmp_path / "other" / "slice0000.dcm").rename(mixed / "z.dcm")
    cases[mixed] = "mixed series: "
    for folder, message in cases.items():
        with pytest.raises(InputError) as err:
            read_volume(folder, mask=False)
        assert str(err.value).startswith(f"{folder}: ") and message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_positions_rounded_to_two_decimals_still_form_a_regular_stack(tmp_path: Path) -> None:
    # An oblique series with 0.6 mm slices whose ImagePositionPatient was written with 2 decimals (as some
    # scanners do): each position is off by up to 0.005 mm per coordinate, which is no gap or tilt.
    direction = rotation("x", 23) @ rotation("z", 11)
    exact = np.array([[1.234, -5.678, 9.1011]]) + np.arange(40)[:, None] * 0.6 * direction[:, 2]
    hu = np.random.default_rng(7).integers(-1000, 1000, (8, 9, 40)).astype(np.int16)
    write_dicom_series(tmp_path / "rounded", hu, (0.5, 0.5, 0.6), direction, positions=np.round(exact, 2))
    vol = read_volume(tmp_path / "rounded", mask=False)
    assert vol.source.is_canonical  # tilts under 45 degrees keep the L, P, S axis order
    np.testing.assert_array_equal(vol.data, hu)
    np.testing.assert_allclose(affine_spacing(vol.affine), (0.5, 0.5, 0.6), atol=0.01)


def test_size_limit_is_checked_from_the_headers_before_the_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _series(tmp_path, "big", n=5)
    monkeypatch.setattr(io, "MAX_VOXELS", 8 * 9 * 5 - 1)
    read_pixels = []
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", lambda self: read_pixels.append(1))
    with pytest.raises(InputError, match=r"big: header claims 8 x 9 x 5 voxels"):
        read_volume(folder, mask=False)
    assert read_pixels == []


def test_a_dicom_ct_read_as_a_mask_points_to_ct(tmp_path: Path) -> None:
    folder = _series(tmp_path, "ct")
    with pytest.raises(InputError, match="pass --threshold T to binarise, or --ct for a CT in HU"):
        read_volume(folder)


def test_a_multi_frame_file_is_read_as_one_volume(tmp_path: Path) -> None:
    stored = np.random.default_rng(6).integers(0, 1500, (6, 8, 10)).astype(np.uint16)  # (z, y, x)
    img = sitk.GetImageFromArray(stored)
    img.SetSpacing((1.0, 1.5, 2.0))
    img.SetOrigin((5.0, 6.0, 7.0))
    (tmp_path / "mf").mkdir()
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        sitk.WriteImage(img, str(tmp_path / "mf" / "volume.dcm"))  # one file, 6 frames
    finally:
        locale.setlocale(locale.LC_ALL, saved)  # GDCM's writer sets the C locale
    vol = read_volume(tmp_path / "mf", mask=False)
    np.testing.assert_array_equal(vol.data, stored.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, _affine((1.0, 1.5, 2.0), np.eye(3), (5.0, 6.0, 7.0)))
