"""The fast full-resolution path of predict against the straightforward one it replaced.

``restore_mask`` (separable interpolation, only where a node is above the threshold) against
``restore_to_grid(...) > threshold`` (scipy's affine_transform), ``_finish`` against
``finish_reference`` (whole-volume maps and islands), and the Fortran-ordered reading / writing
against the values and files of C-ordered arrays. Small volumes in CI; one real SkullFix case when
../shared is present.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import SKULLFIX_TRAINING, seed_of_this_test
from skullrec.data import resample as R
from skullrec.inference import predict as Q
from skullrec.io import Volume, read_volume, write_nifti, write_volume


def _target(shape, spacing, origin=(10.0, -20.0, 5.0)) -> Volume:
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # SkullFix-like: L, P, S axes
    aff[:3, 3] = origin
    return Volume(np.zeros(shape, np.uint8), aff)


def _blob(shape, rng, lo=None, hi=None) -> np.ndarray:
    """A random bone-like mask inside [lo, hi) of the grid (the rest empty)."""
    m = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    if lo is not None:
        keep = np.zeros(shape, bool)
        keep[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
        m &= keep
    return m.astype(np.uint8)


def _smooth_prob(size: int, rng) -> np.ndarray:
    p = ndimage.gaussian_filter(rng.random((size,) * 3), 1.5)
    p = (p - p.min()) / (p.max() - p.min())
    return p.astype(np.float32)


@pytest.mark.parametrize("shape,spacing,margin", [
    ((61, 53, 37), (0.45, 0.45, 0.7), 4.0),  # anisotropic, margin inside the grid
    ((40, 47, 29), (1.0, 0.8, 1.3), 6.0),   # a box reaching past the border (bone near the edge)
])
def test_restore_mask_equals_scipy_restore_to_grid(shape, spacing, margin):
    rng = np.random.default_rng(seed_of_this_test())
    vol = _target(shape, spacing)
    lo = [2, 0, 3] if margin > 5 else [8, 6, 5]
    hi = [s - 3 for s in shape] if margin > 5 else [s - 8 for s in shape]
    vol = vol.like(_blob(shape, rng, lo, hi))
    for size in (16, 24):
        prepared, box = R.prepare_volume(vol, size, margin)
        prob = _smooth_prob(size, rng)
        # 0.5 (predict's) and the map's quantiles, so that every threshold cuts through it
        for thr in (0.5, *np.quantile(prob, [0.02, 0.3, 0.9]).astype(np.float32).tolist()):
            ref = R.restore_to_grid(prob, prepared.affine, vol) > thr
            new = R.restore_mask(prob, prepared.affine, vol, thr)
            assert new.shape == vol.shape and new.dtype == bool and new.flags.f_contiguous
            assert ref.any() and (thr < 0.2 or not ref.all())
            np.testing.assert_array_equal(new, ref, err_msg=f"size {size} threshold {thr}")
        # A map that is zero except in a corner (the "added bone" map): only its neighbourhood is computed.
        corner = np.zeros_like(prob)
        corner[: size // 3, : size // 2, size // 2 :] = (prob[: size // 3, : size // 2, size // 2 :] > 0.4)
        ref = R.restore_to_grid(corner, prepared.affine, vol) > 0.5
        assert 0 < ref.sum() < ref.size // 4
        np.testing.assert_array_equal(R.restore_mask(corner, prepared.affine, vol, 0.5), ref)
        assert not R.restore_mask(np.zeros_like(prob), prepared.affine, vol, 0.5).any()


def test_restore_mask_oblique_target_takes_the_general_path():
    rng = np.random.default_rng(seed_of_this_test())
    vol = _target((30, 34, 28), (1.0, 1.1, 0.9))
    a = np.deg2rad(10)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    prepared_aff = R.prepared_affine(vol.affine, R.Box((2, 2, 2), (28, 32, 26)), 16)
    prepared_aff[:3, :3] = rot @ prepared_aff[:3, :3]  # a prepared grid tilted against the target
    prob = _smooth_prob(16, rng)
    ref = R.restore_to_grid(prob, prepared_aff, vol) > 0.5
    assert ref.any()
    np.testing.assert_array_equal(R.restore_mask(prob, prepared_aff, vol, 0.5), ref)


def _check_finish(vol: Volume, size: int, prob: np.ndarray) -> None:
    prepared, _ = R.prepare_volume(vol, size)
    rec = Q._finish(vol, prepared, prob, 0.5, Q.MIN_ISLAND_MM3)
    complete, implant, removed = Q.finish_reference(vol, prepared, prob)
    np.testing.assert_array_equal(rec.complete.data, complete.astype(np.uint8))
    np.testing.assert_array_equal(rec.implant.data, implant.astype(np.uint8))
    assert rec.islands_removed == removed
    assert rec.info["complete_voxels"] == int(complete.sum()) and rec.info["implant_voxels"] == int(implant.sum())
    assert implant.any(), "the case must have an implant for the comparison to mean something"


def test_finish_equals_the_whole_volume_reference():
    rng = np.random.default_rng(seed_of_this_test())
    shape = (70, 64, 48)
    vol = _target(shape, (0.9, 0.9, 1.2))
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 30) ** 2 + (g[1] / 27) ** 2 + (g[2] / 20) ** 2)
    complete = (r <= 1) & (r >= 0.82)
    defective = complete.copy()
    defective[20:50, 18:44, 34:] = False
    vol = vol.like(defective.astype(np.uint8))
    size = 24
    prepared, box = R.prepare_volume(vol, size)
    truth, _ = R.prepare_volume(vol.like(complete.astype(np.uint8)), size, box=box)
    # The true skull as a soft probability, plus specks the island removal must drop.
    prob = ndimage.gaussian_filter(truth.data.astype(np.float32), 0.7)
    specks = rng.random((size,) * 3) > 0.995
    prob = np.clip(np.where(specks, 0.9, prob), 0, 1).astype(np.float32)
    _check_finish(vol, size, prob)


@pytest.mark.skipif(not SKULLFIX_TRAINING.is_dir(), reason="needs ../shared/data/real-skulls (SkullFix)")
def test_finish_equals_the_reference_on_a_real_skullfix_case():
    vol = read_volume(SKULLFIX_TRAINING / "defective_skull" / "000.nrrd")
    complete = read_volume(SKULLFIX_TRAINING / "complete_skull" / "000.nrrd")
    prepared, box = R.prepare_volume(vol, 64)
    truth, _ = R.prepare_volume(complete, 64, box=box)
    prob = ndimage.gaussian_filter(truth.data.astype(np.float32), 0.8)  # a plausible model output
    _check_finish(vol, 64, prob)


def test_fortran_ordered_volumes_read_prepare_and_write_like_c_ordered(tmp_path):
    """read_volume keeps the file's Fortran order; preparation and the written file are the same as for a C-ordered copy."""
    rng = np.random.default_rng(seed_of_this_test())
    shape = (45, 52, 33)
    data = _blob(shape, rng, (3, 3, 3), (40, 48, 30))
    aff = _target(shape, (0.5, 0.5, 0.8)).affine
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    assert vol.data.flags.f_contiguous and vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, data)
    c_vol = Volume(np.ascontiguousarray(vol.data), vol.affine)
    assert c_vol.data.flags.c_contiguous
    for size in (16, 20):
        box = R.bone_box(vol)
        _same_to_rounding(R.bone_fraction(vol, box, size), R.bone_fraction(c_vol, box, size))
    write_volume(tmp_path / "f.nii.gz", vol.like(vol.data))
    write_nifti(tmp_path / "c.nii.gz", c_vol.data, vol.affine, vol.header)
    assert gzip.decompress((tmp_path / "f.nii.gz").read_bytes()) == gzip.decompress((tmp_path / "c.nii.gz").read_bytes())


def _same_to_rounding(f_order: np.ndarray, c_order: np.ndarray) -> None:
    """Bone fractions of the Fortran and C layouts: equal to float32 rounding, and the same at the 0.5 threshold.

    Bit for bit on an Intel AVX-512 machine's BLAS; an AMD EPYC's BLAS kernels sum the two layouts in
    another order (up to 1.8e-7 apart, 2026-12-06).
    """
    np.testing.assert_allclose(f_order, c_order, rtol=0, atol=2.5e-7)
    np.testing.assert_array_equal(f_order >= 0.5, c_order >= 0.5)


@pytest.mark.skipif(not SKULLFIX_TRAINING.is_dir(), reason="needs ../shared/data/real-skulls (SkullFix)")
@pytest.mark.parametrize("case", ["defective_skull/003.nrrd", "implant/002.nrrd"])
def test_fortran_bone_fraction_matches_c_order_on_real_skulls(case):
    vol = read_volume(SKULLFIX_TRAINING / case)
    assert vol.data.flags.f_contiguous
    c_vol = Volume(np.ascontiguousarray(vol.data), vol.affine)
    box = R.bone_box(vol)
    _same_to_rounding(R.bone_fraction(vol, box, 64), R.bone_fraction(c_vol, box, 64))


def test_float32_above_matches_the_float32_comparison():
    rng = np.random.default_rng(seed_of_this_test())
    for thr in (0.5, 0.25, 0.3, 0.7, 1e-3):
        t = np.float32(thr)
        up = np.nextafter(t, np.float32(np.inf))
        down = np.nextafter(t, np.float32(-np.inf))
        # values on and around both rounding midpoints, the float32 neighbours themselves and random ones
        mids = [(float(t) + float(up)) / 2, (float(t) + float(down)) / 2]
        v = np.array([np.nextafter(m, d) for m in mids for d in (-1.0, 0.0, 1.0)] + [float(up), float(t), float(down)]
                     + mids + rng.uniform(thr - 1e-6, thr + 1e-6, 1000).tolist())
        np.testing.assert_array_equal(R._float32_above(thr)(v), v.astype(np.float32) > t, err_msg=str(thr))


def test_remove_small_islands_equals_indexing_by_label_sizes():
    """The per-box clearing against the whole-array formula keep[labels] it replaced."""
    rng = np.random.default_rng(seed_of_this_test())
    mask = ndimage.gaussian_filter(rng.random((50, 44, 38)), 1.0) > 0.56
    aff = np.diag([0.8, 0.9, 1.1, 1.0])
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    for min_mm3 in (1.0, 5.0, 40.0):
        keep = np.bincount(labels.ravel()) * abs(np.linalg.det(aff[:3, :3])) >= min_mm3
        keep[0] = False
        kept, removed = Q.remove_small_islands(mask, aff, min_mm3)
        assert 0 < removed < n
        np.testing.assert_array_equal(kept, keep[labels])
        assert removed == n - int(keep[1:].sum())
