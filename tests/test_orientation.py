"""One canonical voxel order: the same physical skull stored in all 48 axis orders / flips, as NIfTI
and NRRD, is read identically, reconstructed identically in physical space, written back on each
file's own grid, and gets its set-1 defect at the same physical place."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from skullrec import io as sio
from skullrec.data import synth
from skullrec.data.build import build_dataset
from skullrec.inference.predict import reconstruct
from orientation_helpers import store_in_order as _store

SHAPE = (48, 56, 46)  # all different, so a wrong permutation cannot hide
SPACING = (3.5, 3.2, 3.3)
ORDERS = [(perm, flips) for perm in itertools.permutations(range(3)) for flips in itertools.product((False, True), repeat=3)]


def _canonical_affine() -> np.ndarray:
    """SkullFix-like index layout (axis 0 -> left, 1 -> posterior, 2 -> superior), tilted 14 deg about S."""
    a = np.deg2rad(14.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(SPACING)
    aff[:3, 3] = [81.0, 95.5, -70.25]
    return aff


def _write_nrrd(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lps = np.diag([-1.0, -1.0, 1.0])
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps @ affine[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin((lps @ affine[:3, 3]).tolist())
    sitk.WriteImage(img, str(path))


class ConvProbe(torch.nn.Module):
    """A fixed random 3D convolution (not symmetric under any flip or permutation) standing in for the model."""

    size = 16

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv3d(1, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def skull() -> np.ndarray:
    complete, _ = synth.generate_skull(3, SHAPE, SPACING)
    return complete.astype(np.uint8)


def test_to_canonical_undoes_every_order_and_to_source_grid_redoes_it(skull: np.ndarray) -> None:
    aff = _canonical_affine()
    for perm, flips in ORDERS:
        data, affine = _store(skull, aff, perm, flips)
        canon, canon_aff, source = sio.to_canonical(data, affine)
        np.testing.assert_array_equal(canon, skull)
        np.testing.assert_allclose(canon_aff, aff, atol=1e-9)
        assert source.shape == data.shape and source.is_canonical == (perm == (0, 1, 2) and not any(flips))
        np.testing.assert_array_equal(sio.to_source_grid(canon, source), data)
    assert nib.aff2axcodes(aff) == sio.CANONICAL_AXCODES  # the tilted affine is still closest to L, P, S


def test_48_orders_as_nifti_and_nrrd_give_one_reconstruction_written_back_on_each_grid(tmp_path: Path, skull: np.ndarray) -> None:
    aff = _canonical_affine()
    hdr = nib.Nifti1Header()
    hdr["descrip"] = b"orientation probe"
    files = []
    for k, (perm, flips) in enumerate(ORDERS):
        data, affine = _store(skull, aff, perm, flips)
        nii = tmp_path / f"o{k:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine, hdr.copy()), str(nii))
        nrrd = tmp_path / f"o{k:02d}.nrrd"
        _write_nrrd(nrrd, data, affine)
        files += [(nii, data, affine), (nrrd, data, affine)]
    model = ConvProbe()
    vols = [sio.read_volume(f) for f, _, _ in files]
    for v in vols:
        np.testing.assert_array_equal(v.data, skull)
        np.testing.assert_allclose(v.affine, aff, atol=1e-5)  # NRRD stores float text: 1e-5 mm
    recs = reconstruct(model, vols, batch_size=16)
    ref = recs[0].complete.data
    assert 0 < ref.sum() < ref.size  # the probe makes a non-trivial mask
    for (path, data, affine), rec in zip(files, recs):
        np.testing.assert_array_equal(rec.complete.data, ref, err_msg=str(path))
        out = sio.write_volume(tmp_path / "out" / f"{path.name.split('.')[0]}_{path.suffix[1:]}.nii.gz", rec.complete)
        img = nib.load(str(out))
        assert img.shape == data.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        # Physical voxel for voxel: the file's voxels hold the reference at the same world points.
        expected, _ = _store(ref, aff, *ORDERS[files.index((path, data, affine)) // 2])
        np.testing.assert_array_equal(np.asarray(img.dataobj), expected, err_msg=str(path))
        if path.name.endswith(".nii.gz"):
            assert img.header["descrip"].tobytes().rstrip(b"\0") == b"orientation probe"

    # The check has teeth: the same arrays fed without reorientation reconstruct differently.
    raw = sio.Volume(files[2 * 13][1], files[2 * 13][2])  # a permuted, flipped order taken as it is
    raw_rec = reconstruct(model, [raw])[0].complete.data
    expected13, _ = _store(ref, aff, *ORDERS[13])
    assert not np.array_equal(raw_rec, expected13)


def test_prepare_puts_the_set1_defect_at_one_physical_place_in_every_order(tmp_path: Path, skull: np.ndarray) -> None:
    aff = _canonical_affine()
    centroids, defective_ref, affine_ref = [], None, None
    orders = ORDERS[::3] + [ORDERS[-1]]  # 17 orders: every permutation, every flip pattern
    for k, (perm, flips) in enumerate(orders):
        data, affine = _store(skull, aff, perm, flips)
        src = tmp_path / f"in{k}"
        src.mkdir()
        if k % 2:
            _write_nrrd(src / "skull.nrrd", data, affine)
        else:
            nib.save(nib.Nifti1Image(data, affine), str(src / "skull.nii.gz"))
        out = tmp_path / f"ds{k}"
        build_dataset(complete=src, out=out, size=32, eval_fraction=0.0, seed=5, workers=1)
        d = sio.read_volume(out / "train" / "defective" / "skull.nii.gz")
        imp = sio.read_volume(out / "train" / "implant" / "skull.nii.gz")
        params = json.loads((out / "manifest.json").read_text())["cases"][0]["defect"]
        if defective_ref is None:
            defective_ref, affine_ref, params_ref = d.data, d.affine, params
        np.testing.assert_array_equal(d.data, defective_ref, err_msg=f"order {perm} {flips}")
        np.testing.assert_allclose(d.affine, affine_ref, atol=1e-4)
        assert params == params_ref
        idx = np.argwhere(imp.data > 0)
        centroids.append(nib.affines.apply_affine(imp.affine, idx).mean(axis=0))
    centroids = np.array(centroids)
    assert np.ptp(centroids, axis=0).max() < 1e-3
    # Independently of the frames: the set-1 defect sits at the top-back of the head in RAS mm.
    bone = np.argwhere(skull > 0)
    centre = nib.affines.apply_affine(aff, bone).mean(axis=0)
    rel = centroids[0] - centre
    # Superior is +S in RAS; posterior is the canonical axis 1 (tilted 14 deg about S, so read off along it).
    assert rel[2] > 20.0
    post_dir = aff[:3, 1] / np.linalg.norm(aff[:3, 1])
    assert rel @ post_dir > 20.0


def test_skullfix_grids_are_already_canonical_and_their_tilt_is_kept() -> None:
    """All 100 SkullFix headers (35 tilted, up to 24 deg): the closest axis order is the canonical one,
    so reading them permutes nothing and keeps each tilt in the affine (never refused)."""
    from conftest import SKULLFIX_TRAINING

    files = sorted((SKULLFIX_TRAINING / "complete_skull").glob("*.nrrd"))
    if len(files) < 100:
        pytest.skip("SkullFix training set not available (../shared)")
    tilts = []
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        direction = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(reader.GetDirection()).reshape(3, 3)  # LPS -> RAS
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(reader.GetSpacing())
        _, canon_affine, source = sio.to_canonical(np.zeros((2, 2, 2), np.uint8), affine)
        assert source.is_canonical, f
        np.testing.assert_array_equal(canon_affine, affine)
        # Tilt: the largest angle between an array axis and its closest world axis.
        tilts.append(np.degrees(np.arccos(np.clip(np.abs(direction).max(axis=0), -1, 1))).max())
    tilts = np.array(tilts)
    assert (tilts > 1.0).sum() == 35 and 20.0 < tilts.max() < 25.0, (int((tilts > 1).sum()), tilts.max())


def test_a_nifti_without_orientation_keeps_its_voxel_order_with_a_warning_and_outputs_keep_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    data = (np.random.default_rng(0).random((6, 7, 5)) > 0.5).astype(np.uint8)
    hdr = nib.Nifti1Header()  # qform and sform codes 0, as ANALYZE-era tools and the SkullBreak sample have
    hdr.set_data_shape(data.shape)
    hdr.set_zooms((1.0, 2.0, 3.0))
    nib.save(nib.Nifti1Image(data, None, hdr), str(tmp_path / "bare.nii"))
    assert int(nib.load(str(tmp_path / "bare.nii")).header["sform_code"]) == 0
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        vol = sio.read_volume(tmp_path / "bare.nii")
    assert any("stores no orientation" in r.getMessage() for r in caplog.records)
    # Taken as the canonical order (nibabel's fallback would say L, A, S and reverse axis 1).
    np.testing.assert_array_equal(vol.data, data)
    assert nib.aff2axcodes(vol.affine) == sio.CANONICAL_AXCODES
    np.testing.assert_allclose(vol.spacing, (1.0, 2.0, 3.0))
    # A result written for it has no orientation either and lies on the same voxels.
    out = nib.load(str(sio.write_volume(tmp_path / "out.nii.gz", vol.like(1 - vol.data))))
    assert int(out.header["qform_code"]) == 0 and int(out.header["sform_code"]) == 0
    np.testing.assert_array_equal(np.asarray(out.dataobj), 1 - data)
    np.testing.assert_allclose(out.header.get_zooms(), (1.0, 2.0, 3.0))
