"""skullrec.evaluation.metrics against independent computations (scipy EDT, SimpleITK, numpy, a KD-tree)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SKULLFIX_TRAINING
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from skullrec.evaluation.metrics import BORDER_MM, METRIC_KEYS, batch_metrics, border_dice, border_region, case_metrics, worst_distance

SEEDS = range(6)


def _blob(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random smooth solid shape that may touch the volume border."""
    return ndi.gaussian_filter((rng.random((n, n, n)) < 0.5).astype(float), 2.0) > 0.5


def _shell(n: int, centre, radius: float, thickness: float, spacing) -> np.ndarray:
    """A hollow sphere defined in mm (skull-like: thin, curved, anisotropically sampled)."""
    g = np.indices((n, n, n)).astype(float) * np.asarray(spacing)[:, None, None, None]
    d = np.sqrt(((g - np.asarray(centre)[:, None, None, None]) ** 2).sum(0))
    return (d < radius) & (d > radius - thickness)


def _case(seed: int):
    """Pred/truth/spacing: blobs for even seeds, offset shells for odd ones; anisotropic spacing."""
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 2.0, 3))
    n = 24
    if seed % 2 == 0:
        return _blob(rng, n), _blob(rng, n), spacing
    ext = n * np.asarray(spacing)
    a = _shell(n, ext / 2 + rng.uniform(-1, 1, 3), 0.4 * ext.min(), 2.5, spacing)
    b = _shell(n, ext / 2 + rng.uniform(-1, 1, 3), 0.4 * ext.min() - rng.uniform(0, 1), 2.5, spacing)
    return a, b, spacing


def _edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels as MedPy/AutoImplant define them: mask minus its 6-connected erosion."""
    return mask & ~ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(3, 1))


def _reference_distances(pred, truth, spacing):
    """Directed surface distances from scipy's exact EDT (the AutoImplant/MedPy recipe)."""
    ep, et = _edges(pred), _edges(truth)
    d_pt = ndi.distance_transform_edt(~et, sampling=spacing)[ep]
    d_tp = ndi.distance_transform_edt(~ep, sampling=spacing)[et]
    return d_pt, d_tp


def _sitk_hd(a: np.ndarray, b: np.ndarray, spacing) -> float:
    images = []
    for m in (a, b):
        img = sitk.GetImageFromArray(m.astype(np.uint8).transpose(2, 1, 0))  # sitk arrays are (z, y, x)
        img.SetSpacing(tuple(float(s) for s in spacing))
        images.append(img)
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(*images)
    return f.GetHausdorffDistance()


@pytest.mark.parametrize("seed", SEEDS)
def test_distances_match_scipy_edt(seed):
    pred, truth, spacing = _case(seed)
    for hd95 in ("max", "pooled"):
        m = case_metrics(pred, truth, spacing, hd95=hd95)
        assert m["hd95_definition"] == hd95 and m["failed"] is False
        for unit, sp in (("mm", spacing), ("vox", None)):
            d_pt, d_tp = _reference_distances(pred, truth, sp)
            hd = max(d_pt.max(), d_tp.max())
            if hd95 == "max":
                ref95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
            else:
                ref95 = np.percentile(np.concatenate([d_pt, d_tp]), 95)
            # MONAI returns float32 distances; scipy float64.
            assert m[f"hd_{unit}"] == pytest.approx(hd, rel=1e-6)
            assert m[f"hd95_{unit}"] == pytest.approx(ref95, rel=1e-6)
            assert 0 < m[f"hd95_{unit}"] <= m[f"hd_{unit}"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", SEEDS)
def test_pooled_never_exceeds_max_and_max_equals_monai(seed):
    pred, truth, spacing = _case(seed)
    mx = case_metrics(pred, truth, spacing, hd95="max")
    po = case_metrics(pred, truth, spacing, hd95="pooled")
    # Not a theorem (percentile interpolation), but with thousands of surface distances the pooled
    # 95th percentile cannot exceed the larger directed one by more than interpolation noise.
    assert po["hd95_mm"] <= mx["hd95_mm"] + 1e-9
    assert po["hd_mm"] == mx["hd_mm"] and po["dsc"] == mx["dsc"]
    # "max" is exactly MONAI's compute_hausdorff_distance(percentile=95).
    p, t = torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None]
    monai_hd = compute_hausdorff_distance(p, t, include_background=True, spacing=spacing).item()
    monai_95 = compute_hausdorff_distance(p, t, include_background=True, spacing=spacing, percentile=95).item()
    assert mx["hd_mm"] == pytest.approx(monai_hd, rel=1e-6)
    assert mx["hd95_mm"] == pytest.approx(monai_95, rel=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_hd_matches_simpleitk(seed):
    pred, truth, spacing = _case(seed)
    m = case_metrics(pred, truth, spacing)
    # SimpleITK measures between all foreground voxels in physical space. Fed with the surface
    # voxels it computes exactly our (surface) HD.
    assert m["hd_mm"] == pytest.approx(_sitk_hd(_edges(pred), _edges(truth), spacing), rel=1e-6)
    # On the solid masks it agrees within one voxel diagonal for these shapes (here it is equal);
    # a shape hiding a cavity can differ by more, see test_simpleitk_solid_mask_convention.
    assert abs(m["hd_mm"] - _sitk_hd(pred, truth, spacing)) <= math.hypot(*spacing)


def test_simpleitk_solid_mask_convention():
    """Where full-voxel (SimpleITK) and surface (MONAI, AutoImplant) HD differ: a filled vs a hollow ball."""
    spacing = (1.0, 1.0, 1.0)
    hollow = _shell(31, (15, 15, 15), 12.0, 2.0, spacing)
    filled = ndi.binary_fill_holes(hollow)
    ours = case_metrics(filled, hollow, spacing)["hd_mm"]
    # Surfaces: the shell's inner surface is ~2 mm from the ball's surface.
    assert ours <= 3.0
    # All voxels: the ball's centre is ~10 mm from the nearest shell voxel.
    assert _sitk_hd(filled, hollow, spacing) >= 9.0


def test_hd_analytic_planes():
    """Two parallel one-voxel-thick slabs k slices apart: HD = HD95 = k * spacing_z."""
    spacing = (0.5, 0.7, 1.6)
    a = np.zeros((12, 12, 12), bool)
    b = np.zeros_like(a)
    a[:, :, 2] = True
    b[:, :, 7] = True
    for hd95 in ("max", "pooled"):
        m = case_metrics(a, b, spacing, hd95=hd95)
        assert m["hd_mm"] == pytest.approx(5 * 1.6) and m["hd95_mm"] == pytest.approx(5 * 1.6)
        assert m["hd_vox"] == pytest.approx(5.0) and m["hd95_vox"] == pytest.approx(5.0)
        assert m["dsc"] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_dsc_matches_numpy(seed):
    pred, truth, spacing = _case(seed)
    ref = 2 * np.count_nonzero(pred & truth) / (np.count_nonzero(pred) + np.count_nonzero(truth))
    assert case_metrics(pred, truth, spacing)["dsc"] == pytest.approx(ref, rel=1e-6)
    assert case_metrics(truth, truth, spacing)["dsc"] == pytest.approx(1.0)


def _reference_region(defective: np.ndarray, spacing, border_mm: float) -> np.ndarray:
    """Brute-force border region: nearest defective voxel centre by a KD-tree in mm (no EDT)."""
    sp = np.asarray(spacing)
    tree = cKDTree(np.argwhere(defective) * sp)
    dist, _ = tree.query(np.indices(defective.shape).reshape(3, -1).T * sp)
    return (dist <= border_mm + 1e-9).reshape(defective.shape)


def _np_dice(a, b):
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2 * np.count_nonzero(a & b) / total if total else 0.0


@pytest.mark.parametrize("seed,border", [(0, 6.0), (1, 6.0), (2, 3.0)])
def test_bdsc_matches_bruteforce(seed, border):
    rng = np.random.default_rng(100 + seed)
    spacing = tuple(float(s) for s in rng.uniform(0.8, 2.5, 3))
    n = 28
    ext = n * np.asarray(spacing)
    complete = _shell(n, ext / 2, 0.42 * ext.min(), 4.0, spacing)
    # A defect: remove the shell inside a ball on one side.
    g = np.indices(complete.shape) * np.asarray(spacing)[:, None, None, None]
    centre = ext / 2 + np.array([0.42 * ext.min(), 0, 0])
    hole = np.sqrt(((g - centre[:, None, None, None]) ** 2).sum(0)) < 0.3 * ext.min()
    defective = complete & ~hole
    implant = complete & hole
    # A predicted skull: the truth with some implant voxels lost and some bone added in the hole.
    pred_skull = defective | (implant & (rng.random(implant.shape) < 0.7)) | (hole & (rng.random(hole.shape) < 0.05))
    # Borders below 10 mm so that the region does not cover the whole 28^3 test volume (3 mm also
    # makes border_dice cut the skull to a box around the implants).
    region = _reference_region(defective, spacing, border)
    assert np.array_equal(border_region(defective, spacing, border), region)
    assert 0 < region.sum() < region.size
    # target=skull: implants derived from the skulls; target=implant: used as given.
    ref_skull = _np_dice(pred_skull & ~defective & region, complete & ~defective & region)
    got = border_dice(pred_skull, complete, defective, spacing, target="skull", border_mm=border)
    assert got == pytest.approx(ref_skull)
    pred_implant = pred_skull & ~defective
    assert border_dice(pred_implant, implant, defective, spacing, target="implant", border_mm=border) == pytest.approx(ref_skull)
    # A predicted implant that spills into the defective skull is penalised only with target=implant.
    spill = pred_implant | defective
    ref_spill = _np_dice(spill & region, implant & region)
    assert border_dice(spill, implant, defective, spacing, target="implant", border_mm=border) == pytest.approx(ref_spill)
    assert ref_spill < ref_skull
    # case_metrics uses the 10 mm default.
    m = case_metrics(pred_skull, complete, spacing, defective=defective)
    r10 = _reference_region(defective, spacing, BORDER_MM)
    assert m["bdsc"] == pytest.approx(_np_dice(pred_skull & ~defective & r10, implant & r10))


def test_bdsc_none_without_defective_and_zero_when_no_implant():
    a = np.zeros((10, 10, 10), bool)
    a[2:8, 2:8, 2:8] = True
    assert case_metrics(a, a, (1, 1, 1))["bdsc"] is None
    # Nothing to implant (pred == truth == defective): AutoImplant's 0/0 -> 0.
    assert case_metrics(a, a, (1, 1, 1), defective=a)["bdsc"] == 0.0


@pytest.mark.parametrize("which", ["pred", "truth", "both"])
def test_empty_masks_fail_with_worst_values(which):
    shape, spacing = (16, 20, 12), (0.5, 1.0, 2.0)
    full = np.zeros(shape, bool)
    full[4:10, 5:12, 3:8] = True
    empty = np.zeros(shape, bool)
    pred = empty if which in ("pred", "both") else full
    truth = empty if which in ("truth", "both") else full
    # What MONAI alone would give (the reason for this handling): inf HD, NaN HD95.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, t = torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None]
        raw95 = compute_hausdorff_distance(p, t, include_background=True, spacing=spacing, percentile=95).item()
    if which != "both":
        assert math.isnan(raw95)
    for hd95 in ("max", "pooled"):
        m = case_metrics(pred, truth, spacing, defective=full, hd95=hd95)
        assert m["failed"] is True and "empty" in m["failure"]
        diag_mm = math.sqrt((16 * 0.5) ** 2 + 20.0**2 + (12 * 2.0) ** 2)
        assert m["hd_mm"] == m["hd95_mm"] == pytest.approx(diag_mm)
        assert m["hd_vox"] == m["hd95_vox"] == pytest.approx(math.sqrt(16**2 + 20**2 + 12**2))
        assert m["dsc"] == 0.0 and m["bdsc"] == 0.0
        assert m["hd95_definition"] == hd95
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values())
    assert worst_distance(shape, spacing) == pytest.approx(diag_mm)


def test_keys_and_bad_arguments():
    a = np.zeros((8, 8, 8), np.uint8)
    a[2:6, 2:6, 2:6] = 1
    m = case_metrics(a, a, (1.0, 1.0, 1.0))
    assert tuple(m) == METRIC_KEYS
    # Plain Python values (JSON/CSV-safe), not numpy scalars.
    m = case_metrics(a, a, (1.0, 1.0, 1.0), defective=a)
    assert all(type(m[k]) is float for k in ("dsc", "bdsc", "hd_mm", "hd95_mm", "hd_vox", "hd95_vox"))
    assert type(m["failed"]) is bool
    assert m["dsc"] == pytest.approx(1.0) and m["hd_mm"] == 0.0 and m["hd95_vox"] == 0.0
    with pytest.raises(ValueError, match="hd95"):
        case_metrics(a, a, (1, 1, 1), hd95="mean")
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(a, a[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="binary"):
        case_metrics(a * 2, a, (1, 1, 1))


def test_batch_metrics_equals_case_metrics():
    cases = [_case(s) for s in range(3)]
    # Same grid for stacking; each case keeps its own spacing.
    pred = np.stack([c[0] for c in cases])
    truth = np.stack([c[1] for c in cases])
    spacings = [c[2] for c in cases]
    pred[2] = False  # a failed case in the batch must stay in place
    singles = [case_metrics(pred[i], truth[i], spacings[i], defective=truth[i], hd95="pooled") for i in range(3)]
    batched = batch_metrics(torch.from_numpy(pred), truth, spacings, defective=truth, hd95="pooled")
    assert batched == singles
    assert [r["failed"] for r in batched] == [False, False, True]


REAL = SKULLFIX_TRAINING


@pytest.mark.real
def test_real_skullfix_case_against_scipy():
    """SkullFix case 000 (0.45 x 0.45 x 0.63 mm), cut to the defect +- 12 voxels to keep it quick:
    'prediction' = the defective skull (nothing reconstructed), truth = the complete skull."""
    if not (REAL / "complete_skull" / "000.nrrd").is_file():
        pytest.skip("real SkullFix data not present")
    from skullrec.io import read_volume

    complete = read_volume(REAL / "complete_skull" / "000.nrrd")
    defective = read_volume(REAL / "defective_skull" / "000.nrrd")
    c, d = complete.data.astype(bool), defective.data.astype(bool)
    idx = np.argwhere(c & ~d)
    box = tuple(slice(max(a - 12, 0), b + 13) for a, b in zip(idx.min(0), idx.max(0)))
    c, d, spacing = c[box], d[box], complete.spacing
    m = case_metrics(d, c, spacing, defective=d, hd95="pooled")
    d_pt, d_tp = _reference_distances(d, c, spacing)
    assert m["hd_mm"] == pytest.approx(max(d_pt.max(), d_tp.max()), rel=1e-6)
    assert m["hd95_mm"] == pytest.approx(np.percentile(np.concatenate([d_pt, d_tp]), 95), rel=1e-6)
    assert m["dsc"] == pytest.approx(2 * d.sum() / (d.sum() + c.sum()), rel=1e-6)
    assert m["hd_mm"] > 10  # the missing bone plate is centimetres deep in places
    assert m["bdsc"] == 0.0  # nothing predicted in the defect
    assert case_metrics(c, c, spacing, defective=d)["bdsc"] == pytest.approx(1.0)
