"""skullrec.data.defects: set-1 / set-2 defects remove bone in the documented range, where they should, deterministically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SKULLFIX_TRAINING
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.data import defects, synth
from skullrec.data.defects import SET1_FRACTION, SET2_FRACTION, SET2_REGIONS, SET2_SHAPES, set1_defect, set2_defect
from skullrec.io import read_volume, write_nifti

GRID = synth.source_grid(64)
SMALL = synth.source_grid(32)
REAL = SKULLFIX_TRAINING
runner = CliRunner()


@pytest.fixture(scope="module")
def skulls() -> list[np.ndarray]:
    return [synth.generate_skull(seed, *GRID)[0] for seed in (10, 11)]


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    return idx.min(0), idx.max(0)


def _relative_centroid(complete: np.ndarray, implant: np.ndarray) -> np.ndarray:
    lo, hi = _bbox(complete)
    return (np.argwhere(implant).mean(0) - lo) / (hi - lo)


def _azimuth_elevation(complete: np.ndarray, points_vox: np.ndarray, spacing) -> tuple[float, float]:
    """Direction (degrees) of a point set's centroid from the skull's bounding-box centre, in mm."""
    lo, hi = _bbox(complete)
    v = (points_vox.mean(0) - (lo + hi) / 2) * np.asarray(spacing)
    v /= np.linalg.norm(v)
    return math.degrees(math.atan2(v[1], v[0])), math.degrees(math.asin(v[2]))


def _angle_in(a: float, lo: float, hi: float, tol: float) -> bool:
    """Azimuth a within [lo, hi] (degrees, on the circle) up to tol."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return abs((a - mid + 180) % 360 - 180) <= half + tol


def test_set1_removes_the_documented_fraction_at_the_top_back(skulls) -> None:
    spacing = GRID[1]
    for seed, complete in enumerate(skulls):
        defective, params = set1_defect(complete, spacing, np.random.default_rng(seed))
        assert defective.dtype == np.bool_ and defective.shape == complete.shape
        assert not (defective & ~complete).any()  # a subset of the complete skull
        implant = complete & ~defective
        frac = implant.sum() / complete.sum()
        assert SET1_FRACTION[0] <= frac <= SET1_FRACTION[1]
        assert params["removed_voxels"] == implant.sum() and params["removed_fraction"] == pytest.approx(frac, abs=1e-5)
        rel = _relative_centroid(complete, implant)
        # like SkullFix (centroid at 0.46-0.58 left-right, 0.72-0.82 back, 0.82-0.88 up of the skull's box)
        assert 0.35 < rel[0] < 0.65 and rel[1] > 0.6 and rel[2] > 0.7, rel
        assert params["set"] == 1 and params["shape"] == "rounded_cuboid" and len(params["centre_mm"]) == 3


def test_set1_is_deterministic_and_seed_dependent(skulls) -> None:
    complete = skulls[0]
    a, pa = set1_defect(complete, GRID[1], np.random.default_rng(5))
    b, pb = set1_defect(complete, GRID[1], np.random.default_rng(5))
    c, _ = set1_defect(complete, GRID[1], np.random.default_rng(6))
    assert a.tobytes() == b.tobytes() and json.dumps(pa) == json.dumps(pb)
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("region", list(SET2_REGIONS))
def test_set2_regions_are_where_they_say_and_in_range(skulls, region: str) -> None:
    complete = skulls[1]
    spacing = GRID[1]
    spec = SET2_REGIONS[region]
    shape = SET2_SHAPES[list(SET2_REGIONS).index(region) % len(SET2_SHAPES)]
    defective, params = set2_defect(complete, spacing, np.random.default_rng(3), region=region, shape=shape)
    assert not (defective & ~complete).any() and defective.any()
    implant = complete & ~defective
    frac = implant.sum() / complete.sum()
    assert SET2_FRACTION[0] <= frac <= SET2_FRACTION[1]
    assert params["region"] == region and params["shape"] == shape and params["set"] == 2
    assert params["removed_fraction"] == pytest.approx(frac, abs=1e-5)
    pts = np.argwhere(implant)
    mid_x = sum(_bbox(complete)[i][0] for i in (0, 1)) / 2
    if region == "bilateral":
        left, right = pts[pts[:, 0] > mid_x], pts[pts[:, 0] < mid_x]  # axis 0 points to the patient's left
        assert min(len(left), len(right)) > 0.3 * len(pts)  # bone removed on both sides
        groups = [(left, spec["az"]), (right, (180 - spec["az"][1], 180 - spec["az"][0]))]
    elif spec.get("side"):
        side_pts = pts[pts[:, 0] > mid_x] if params["side"] == "left" else pts[pts[:, 0] < mid_x]
        assert len(side_pts) > 0.9 * len(pts)
        az = spec["az"] if params["side"] == "left" else (180 - spec["az"][1], 180 - spec["az"][0])
        groups = [(pts, az)]
    else:
        groups = [(pts, spec["az"])]
    for group, az_range in groups:
        az, el = _azimuth_elevation(complete, group, spacing)
        # the removed bone's centroid lies slightly inside the shell, so allow some slack
        assert _angle_in(az, *az_range, tol=20), (region, az)
        assert spec["el"][0] - 20 <= el <= spec["el"][1] + 20, (region, el)


def test_set2_draws_vary_and_are_deterministic(skulls) -> None:
    complete = skulls[0]
    seen = set()
    for seed in range(6):
        d1, p1 = set2_defect(complete, GRID[1], np.random.default_rng(seed))
        d2, p2 = set2_defect(complete, GRID[1], np.random.default_rng(seed))
        assert d1.tobytes() == d2.tobytes() and p1 == p2
        assert SET2_FRACTION[0] <= p1["removed_fraction"] <= SET2_FRACTION[1]
        seen.add((p1["region"], p1["shape"]))
    assert len(seen) >= 4


def test_defects_never_empty_a_small_skull_and_refuse_an_empty_one() -> None:
    complete, _ = synth.generate_skull(2, *SMALL)  # 3 mm voxels
    for fn in (set1_defect, set2_defect):
        for seed in range(3):
            d, p = fn(complete, SMALL[1], np.random.default_rng(seed))
            assert d.sum() > 0.8 * complete.sum()
    with pytest.raises(defects.DefectError):
        set1_defect(np.zeros((20, 20, 20), bool), (1.0, 1.0, 1.0), np.random.default_rng(0))


@pytest.mark.real
def test_set1_on_a_real_skullfix_skull_matches_its_real_defect() -> None:
    cpath = REAL / "complete_skull" / "000.nrrd"
    if not cpath.is_file():
        pytest.skip("SkullFix data not available")
    vol = read_volume(cpath)
    stride = (4, 4, 3)  # 0.45 x 0.45 x 0.63 mm -> 1.8 x 1.8 x 1.9 mm: fast, the 5-7 mm vault stays intact
    complete = vol.data[:: stride[0], :: stride[1], :: stride[2]].astype(bool)
    spacing = tuple(s * k for s, k in zip(vol.spacing, stride))
    given = read_volume(REAL / "defective_skull" / "000.nrrd").data[:: stride[0], :: stride[1], :: stride[2]].astype(bool)
    real_implant = complete & ~given
    defective, params = set1_defect(complete, spacing, np.random.default_rng(0))
    implant = complete & ~defective
    frac = implant.sum() / complete.sum()
    assert SET1_FRACTION[0] <= frac <= SET1_FRACTION[1]
    # near SkullFix's own defect of this skull (removed fraction 0.079, centroid (0.48, 0.76, 0.86) of the box)
    np.testing.assert_allclose(_relative_centroid(complete, implant), _relative_centroid(complete, real_implant), atol=0.12)
    overlap = (implant & real_implant).sum() / real_implant.sum()
    assert overlap > 0.3, overlap


def _write_skulls(folder: Path, seeds=(0, 1, 2)) -> None:
    shape, spacing = SMALL
    aff = synth.source_affine(shape, spacing)
    for s in seeds:
        write_nifti(folder / f"case{s}.nii.gz", synth.generate_skull(s, shape, spacing)[0], aff)


def test_defects_command_cuts_both_sets_and_writes_the_layout(tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_skulls(inp)
    res = runner.invoke(app, ["defects", "--in", str(inp), "--out", str(out), "--seed", "1", "--eval-fraction", "0.34"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {}
    for rec in manifest["cases"]:
        splits.setdefault(rec["split"], []).append(rec["case_id"])
        d = rec["defect"]
        assert d["set"] == (2 if rec["split"] == "eval_set2" else 1)
        lo, hi = SET2_FRACTION if d["set"] == 2 else SET1_FRACTION
        assert lo <= d["removed_fraction"] <= hi
        c = np.asarray(nib.load(str(out / rec["split"] / "complete" / f"{rec['case_id']}.nii.gz")).dataobj)
        dd = np.asarray(nib.load(str(out / rec["split"] / "defective" / f"{rec['case_id']}.nii.gz")).dataobj)
        assert c.shape == (64, 64, 64) and not (dd & ~c).any() and (c & ~dd).any()
    assert len(splits["train"]) == 2 and splits["eval_set1"] == splits["eval_set2"] and len(splits["eval_set1"]) == 1
    assert sorted(splits["train"] + splits["eval_set1"]) == ["case0", "case1", "case2"]


def test_defects_command_bad_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["defects", "--in", str(empty), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and str(empty) in res.output
    assert "Traceback" not in res.output

    inp = tmp_path / "in"
    _write_skulls(inp, seeds=(0,))
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    res = runner.invoke(app, ["defects", "--in", str(inp), "--out", str(old)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--overwrite" in res.output
    assert (old / "manifest.json").read_text() == "{}" and len(list(old.iterdir())) == 1

    # a probability map is not a mask: refuse without --threshold, accept with it
    prob = tmp_path / "prob"
    shape, spacing = SMALL
    skull = synth.generate_skull(5, shape, spacing)[0]
    write_nifti(prob / "p.nii.gz", skull * 0.9 + 0.05, synth.source_affine(shape, spacing), dtype=np.float32)
    res = runner.invoke(app, ["defects", "--in", str(prob), "--out", str(tmp_path / "o2"), "--eval-fraction", "0"])
    assert res.exit_code == 2 and "--threshold" in res.output and "p.nii.gz" in res.output
    res = runner.invoke(app, ["defects", "--in", str(prob), "--out", str(tmp_path / "o2"), "--eval-fraction", "0", "--threshold", "0.5"])
    assert res.exit_code == 0, res.output


def test_cut_shapes_have_their_analytic_volume() -> None:
    """Rounded box and ellipsoid, cut from solid bone at 0.5 mm, against their closed-form volumes."""
    sp = np.array([0.5, 0.5, 0.5])
    solid = np.ones((120, 120, 120), dtype=bool)
    centre = np.array([30.0, 30.0, 30.0])
    frame = defects._frame(np.array([0.3, -0.2, 0.93]), spin_deg=17.0)
    np.testing.assert_allclose(frame @ frame.T, np.eye(3), atol=1e-12)  # orthonormal
    hu, hv, hw, r = 20.0, 14.0, 6.0, 5.0
    box = defects._cut(solid, sp, [(centre, 30.0, defects._rounded_box(frame, (hu, hv, hw), r))])
    exact = (4 * hu * hv - (4 - math.pi) * r**2) * 2 * hw  # rounded rectangle area x depth
    assert box.sum() * sp.prod() == pytest.approx(exact, rel=0.02)
    radii = (22.0, 15.0, 9.0)
    ell = defects._cut(solid, sp, [(centre, 23.0, defects._ellipsoid(frame, radii))])
    assert ell.sum() * sp.prod() == pytest.approx(4 / 3 * math.pi * np.prod(radii), rel=0.02)
    # the ellipsoid's long axis lies along the frame's first row
    pts = (np.argwhere(ell) * sp - centre)
    main_axis = np.linalg.eigh(np.cov(pts.T))[1][:, -1]
    assert abs(main_axis @ frame[0]) > 0.99
