"""skullrec.data.resample: exact partial-volume downsampling, geometry kept in mm, prepare_pair, restore_to_grid,
`skullrec prepare` (layout, manifest, errors), and real SkullFix skulls (skipped when ../shared is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SKULLFIX_TRAINING, seed_of_this_test
from skimage.measure import block_reduce
from typer.testing import CliRunner

from skullrec.cli import app, prepare_command
from skullrec.data import build as B
from skullrec.data import resample as P
from skullrec.errors import InputError
from skullrec.io import Volume, read_volume, write_nifti

REAL = SKULLFIX_TRAINING


def _oblique_affine(spacing=(0.6, 0.8, 1.1)) -> np.ndarray:
    a = np.deg2rad(15)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(9)  # SkullFix's grids are tilted 9 degrees about the left-right axis (a rotation, not a shear)
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ tilt @ np.diag(spacing)
    aff[:3, 3] = [-40.0, 25.0, -12.5]
    return aff


def _shell(shape=(50, 44, 38), centre=(25, 21, 17), radii=(20, 17, 14), thickness=2.0) -> np.ndarray:
    """An ellipsoidal shell in index space (a stand-in skull vault)."""
    g = np.meshgrid(*(np.arange(n) - c for n, c in zip(shape, centre)), indexing="ij")
    r = np.sqrt(sum((x / rr) ** 2 for x, rr in zip(g, radii)))
    return ((r <= 1.0) & (r >= 1.0 - thickness / min(radii))).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_bone_fraction_is_the_exact_partial_volume_fraction() -> None:
    rng = np.random.default_rng(0)
    src = (rng.random((24, 36, 12)) > 0.7).astype(np.uint8)
    vol = Volume(src, np.eye(4))
    # Integer factor: the fraction is the block mean (skimage), box = the whole volume.
    frac = P.bone_fraction(vol, P.Box((0, 0, 0), (24, 36, 12)), size=6)
    assert frac.shape == (6, 6, 6)
    np.testing.assert_allclose(frac, block_reduce(src.astype(np.float64), (4, 6, 2), np.mean), atol=1e-6)
    # Non-integer factor (step 1.5 voxels) and a box reaching outside the volume (zero padding):
    # repeat each source voxel twice, pad, then 3x3x3 block means are the exact fractions.
    box = P.Box((-3, 0, -3), (9, 12, 9))
    frac = P.bone_fraction(vol, box, size=8)
    up = np.zeros((24, 24, 24))
    up[6:, :, 6:] = src[:9, :12, :9].repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_allclose(frac, block_reduce(up, (3, 3, 3), np.mean), atol=1e-6)


def test_rule_is_monotone_so_defective_stays_inside_complete() -> None:
    rng = np.random.default_rng(1)
    big = _shell()
    small = big & (rng.random(big.shape) > 0.3)  # a subset with many holes
    aff = _oblique_affine()
    b64, box = P.prepare_volume(Volume(big, aff), size=16, margin_mm=2.0)
    s64, _ = P.prepare_volume(Volume(small, aff), size=16, box=box)
    assert s64.data.sum() > 0
    assert not (s64.data.astype(bool) & ~b64.data.astype(bool)).any()
    np.testing.assert_allclose(s64.affine, b64.affine)


def test_prepared_volume_keeps_physical_extent_and_positions() -> None:
    src = _shell()
    aff = _oblique_affine()
    vol = Volume(src, aff)
    margin = 3.0
    p, box = P.prepare_volume(vol, size=32, margin_mm=margin)
    assert p.shape == (32, 32, 32) and p.data.dtype == np.uint8
    # Box = bone bbox + ceil(margin / spacing) voxels on each side.
    idx = np.argwhere(src)
    m = np.ceil(margin / np.array(vol.spacing)).astype(int)
    assert box.lo == tuple(int(v) for v in idx.min(0) - m) and box.hi == tuple(int(v) for v in idx.max(0) + 1 + m)
    np.testing.assert_allclose(p.spacing, np.array(box.shape) / 32 * np.array(vol.spacing), rtol=1e-9)
    # The prepared bone, mapped into source index space through the two affines, spans the
    # source bone's bbox to within one prepared voxel on every side.
    pts = np.c_[np.argwhere(p.data), np.ones(int(p.data.sum()))]
    in_src = (np.linalg.inv(aff) @ p.affine @ pts.T).T[:, :3]
    step = np.array(box.shape) / 32
    assert np.all(np.abs(in_src.min(0) - idx.min(0)) <= step)
    assert np.all(np.abs(in_src.max(0) - idx.max(0)) <= step)
    # The prepared grid's first and last voxel centres are half a prepared voxel inside the box edges.
    first = np.linalg.inv(aff) @ p.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(first[:3], np.array(box.lo) - 0.5 + step / 2, atol=1e-9)


def test_restore_to_grid_is_exact_for_linear_maps_and_overlaps_the_source() -> None:
    src = _shell()
    aff = _oblique_affine()
    vol = Volume(src, aff)
    p, box = P.prepare_volume(vol, size=32, margin_mm=3.0)
    # A map that is linear in world coordinates is reproduced exactly by linear interpolation
    # wherever the target voxel centre lies between prepared voxel centres.
    ijk = np.stack(np.meshgrid(*(np.arange(32),) * 3, indexing="ij"), -1).reshape(-1, 3)
    world = (p.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    lin = (world @ [0.3, -0.2, 0.5] + 7.0).reshape(32, 32, 32).astype(np.float32)
    restored = P.restore_to_grid(lin, p.affine, vol)
    assert restored.shape == vol.shape and restored.dtype == np.float32
    t_ijk = np.argwhere(np.ones(vol.shape, bool))
    t_world = (aff @ np.c_[t_ijk, np.ones(len(t_ijk))].T).T[:, :3]
    expect = (t_world @ [0.3, -0.2, 0.5] + 7.0).reshape(vol.shape)
    in_p = (np.linalg.inv(p.affine) @ np.c_[t_world, np.ones(len(t_world))].T).T[:, :3].reshape(*vol.shape, 3)
    inside = np.all((in_p >= 0) & (in_p <= 31), axis=-1)
    assert inside.sum() > 0.5 * src.size
    np.testing.assert_allclose(restored[inside], expect[inside], atol=1e-3)
    # Far outside the prepared grid: cval.
    outside = np.any((in_p < -1) | (in_p > 32), axis=-1)
    assert outside.any() and np.all(restored[outside] == 0)
    # The binary round trip overlaps the source skull.
    back = P.restore_to_grid(p.data.astype(np.float32), p.affine, vol) > 0.5
    assert _dice(back, src) > 0.75


def test_prepare_pair_uses_the_defective_box_and_keeps_defective_inside() -> None:
    aff = _oblique_affine()
    complete = _shell()
    defective = complete.copy()
    defective[:, :, 26:] = 0  # remove the top of the vault: the defective bbox is smaller
    c64, d64 = P.prepare_pair(Volume(complete, aff), Volume(defective, aff), size=16, margin_mm=1.0)
    _, dbox = P.prepare_volume(Volume(defective, aff), size=16, margin_mm=1.0)
    np.testing.assert_allclose(c64.affine, P.prepared_affine(aff, dbox, 16))
    np.testing.assert_allclose(d64.affine, c64.affine)
    assert not (d64.data.astype(bool) & ~c64.data.astype(bool)).any()
    assert (c64.data.astype(bool) & ~d64.data.astype(bool)).sum() > 0
    with pytest.raises(InputError, match="d.nii.gz.*differs"):
        P.prepare_pair(Volume(complete, aff), Volume(defective[:-1], aff, path=Path("d.nii.gz")))
    with pytest.raises(InputError, match="no bone"):
        P.prepare_volume(Volume(np.zeros((8, 8, 8), np.uint8), aff, path=Path("zero.nii.gz")))


def _write_pairs(folder: Path, n: int, defective: bool = True, shape=(40, 36, 30)) -> None:
    aff = _oblique_affine((1.2, 1.3, 1.5))
    for i in range(n):
        c = _shell(shape, (20, 18, 15), (16 - i, 14, 12), 2.0)  # every case a different skull (prepare drops copies)
        write_nifti(folder / "complete" / f"{i:03d}.nii.gz", c, aff)
        if defective:
            d = c.copy()
            d[12:28, 10:26, 20:] = 0
            write_nifti(folder / "defective" / f"{i:03d}.nii.gz", d, aff)


def test_prepare_command_with_given_defects_writes_the_layout(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "src", 3)
    out = tmp_path / "ds"
    prepare_command(complete=tmp_path / "src" / "complete", out=out, defective=tmp_path / "src" / "defective",
                      size=16, margin_mm=2.0, eval_fraction=0.0, seed=0, workers=1)
    man = json.loads((out / "manifest.json").read_text())
    assert [r["case_id"] for r in man["cases"]] == ["000", "001", "002"]
    assert {r["split"] for r in man["cases"]} == {"train"}
    assert man["meta"]["size"] == 16 and man["meta"]["eval_ids"] == []
    for r in man["cases"]:
        c = read_volume(out / "train" / "complete" / f"{r['case_id']}.nii.gz")
        d = read_volume(out / "train" / "defective" / f"{r['case_id']}.nii.gz")
        imp = read_volume(out / "train" / "implant" / f"{r['case_id']}.nii.gz")
        assert c.shape == (16, 16, 16)
        np.testing.assert_array_equal(imp.data, c.data & (1 - d.data))
        assert imp.data.sum() == r["implant_voxels"] > 0
        assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging left behind


def test_prepare_command_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no volume files"):
        prepare_command(complete=empty, out=tmp_path / "o1")
    _write_pairs(tmp_path / "src", 2)
    (tmp_path / "src" / "defective" / "001.nii.gz").unlink()
    with pytest.raises(InputError, match="001.nii.gz: no defective partner"):
        prepare_command(complete=tmp_path / "src" / "complete", out=tmp_path / "o2", defective=tmp_path / "src" / "defective")
    write_nifti(tmp_path / "src" / "defective" / "001.nii.gz", np.zeros((40, 36, 29), np.uint8), np.eye(4))
    with pytest.raises(InputError, match=r"defective/001.nii.gz: shape \(40, 36, 29\) differs"):
        prepare_command(complete=tmp_path / "src" / "complete", out=tmp_path / "o3", defective=tmp_path / "src" / "defective",
                          size=16, eval_fraction=0.0, workers=1)
    assert not (tmp_path / "o3").exists()  # nothing half-written
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="--overwrite"):
        prepare_command(complete=tmp_path / "src" / "complete", out=busy)
    assert (busy / "keep.txt").read_text() == "x"


def test_prepare_cli_reports_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["prepare", "--in", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "no volume files" in res.output and "Traceback" not in res.output


def test_split_is_seeded_and_disjoint() -> None:
    ids = [f"{i:03d}" for i in range(100)]
    tr, ev = B.split_cases(ids, 0.2, seed=3)
    assert len(ev) == 20 and not set(tr) & set(ev) and sorted(tr + ev) == ids
    assert B.split_cases(ids, 0.2, seed=3) == (tr, ev)
    assert B.split_cases(ids, 0.2, seed=4)[1] != ev


# ------------------------------------------------------------------ real SkullFix skulls (../shared)

REAL_CASES = ["000", "002", "004"]


@pytest.fixture(scope="module")
def skullfix() -> dict[str, dict[str, Volume]]:
    if not (REAL / "implant" / "004.nrrd").is_file():
        pytest.skip("SkullFix data not found in ../shared")
    cases = {}
    for cid in REAL_CASES:
        v = {kind: read_volume(REAL / folder / f"{cid}.nrrd") for kind, folder in
             (("complete", "complete_skull"), ("defective", "defective_skull"), ("implant", "implant"))}
        # Prepared once per case and shared by the tests below (reading + preparing is the slow part).
        v["c64"], v["d64"] = P.prepare_pair(v["complete"], v["defective"], size=64, margin_mm=4.0)
        v["box"] = P.bone_box(v["defective"], 4.0)
        cases[cid] = v
    return cases


@pytest.mark.real
def test_real_skulls_prepare_to_one_piece_with_the_right_extent(skullfix) -> None:
    for cid, v in skullfix.items():
        c64, d64 = v["c64"], v["d64"]
        assert c64.shape == (64, 64, 64)
        lcc6 = P.largest_component_fraction(c64.data, connectivity=1)
        assert lcc6 >= 0.99, (cid, lcc6)
        assert P.largest_component_fraction(d64.data, connectivity=3) >= 0.99
        # Physical extent: world coordinates of the bone voxel centres, source vs prepared, agree
        # per world axis to within one prepared voxel (measured: at most 2.4 mm on cases 000-004).
        def world_bbox(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
            ijk = [a.astype(np.float32) for a in np.nonzero(vol.data)]
            w = [sum(vol.affine[r, c] * ijk[c] for c in range(3)) + vol.affine[r, 3] for r in range(3)]
            return np.array([x.min() for x in w]), np.array([x.max() for x in w])

        slo, shi = world_bbox(v["complete"])
        plo, phi = world_bbox(c64)
        tol = max(c64.spacing)
        assert np.all(np.abs(slo - plo) <= tol) and np.all(np.abs(shi - phi) <= tol), (cid, slo, plo, shi, phi)
        # Bone fraction of the box: close to the exact partial-volume fraction (the rule thickens a little).
        exact = P.bone_fraction(v["complete"], v["box"], 64).mean()
        assert exact < c64.data.mean() < 1.5 * exact


@pytest.mark.real
def test_real_implant_at_64_matches_the_shipped_implant(skullfix) -> None:
    for cid, v in skullfix.items():
        c64, d64 = v["c64"], v["d64"]
        implant64 = c64.data.astype(bool) & ~d64.data.astype(bool)
        assert not (d64.data.astype(bool) & ~c64.data.astype(bool)).any()
        assert implant64.sum() > 500
        shipped64, _ = P.prepare_volume(v["implant"], 64, box=v["box"])
        np.testing.assert_allclose(shipped64.affine, c64.affine)
        dice = _dice(implant64, shipped64.data)
        assert dice > 0.85, (cid, dice)


@pytest.mark.real
def test_real_restore_to_grid_overlaps_the_original(skullfix) -> None:
    v = skullfix["000"]
    c64 = v["c64"]
    back = P.restore_to_grid(c64.data.astype(np.float32), c64.affine, v["complete"]) > 0.5
    assert back.shape == v["complete"].shape
    assert _dice(back, v["complete"].data) > 0.8


def test_prepare_command_eval_sets_are_seeded_and_worker_independent(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "src", 3)
    kw = dict(complete=tmp_path / "src" / "complete", defective=tmp_path / "src" / "defective", size=16,
              margin_mm=2.0, eval_fraction=0.4, seed=5)
    prepare_command(out=tmp_path / "a", workers=1, **kw)
    prepare_command(out=tmp_path / "b", workers=2, **kw)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man == json.loads((tmp_path / "b" / "manifest.json").read_text())
    ev = man["meta"]["eval_ids"]
    assert len(ev) == 1 and len(man["meta"]["train_ids"]) == 2
    splits = {(r["split"], r["case_id"]) for r in man["cases"]}
    assert splits == {("train", c) for c in man["meta"]["train_ids"]} | {(s, ev[0]) for s in ("eval_set1", "eval_set2", "eval_skullfix")}
    for r in man["cases"]:
        assert r["implant_voxels"] > 0 and r["defective_voxels"] > 0
        if r["split"] in ("eval_set1", "eval_set2"):
            assert r["defect"]["set"] == int(r["split"][-1]) and r["defect_seed"] == B.case_seed(5, ev[0], int(r["split"][-1]))
        for kind in ("complete", "defective", "implant"):
            a = read_volume(tmp_path / "a" / r["split"] / kind / f"{r['case_id']}.nii.gz")
            b = read_volume(tmp_path / "b" / r["split"] / kind / f"{r['case_id']}.nii.gz")
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.affine, b.affine)
    # The set-1 and set-2 defects differ from each other and from SkullFix's own defect.
    d = {s: read_volume(tmp_path / "a" / s / "defective" / f"{ev[0]}.nii.gz").data for s in ("eval_set1", "eval_set2", "eval_skullfix")}
    assert not np.array_equal(d["eval_set1"], d["eval_set2"]) and not np.array_equal(d["eval_set1"], d["eval_skullfix"])


def test_prepare_cli_non_binary_input_needs_threshold(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "src", 1)
    path = tmp_path / "src" / "complete" / "000.nii.gz"
    v = read_volume(path)
    write_nifti(path, v.data * 200, v.affine)  # a 0/200 mask, as some exporters write
    args = ["prepare", "--in", str(tmp_path / "src" / "complete"), "--defective", str(tmp_path / "src" / "defective"),
            "--size", "16", "--eval-fraction", "0"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "o1")])
    assert res.exit_code == 2 and "000.nii.gz" in res.output and "--threshold" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o1").exists()
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "o2"), "--threshold", "0.5"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read_volume(tmp_path / "o2" / "train" / "complete" / "000.nii.gz").data.max(), 1)


def test_prepare_names_the_file_when_no_defect_fits(tmp_path):
    """A complete skull too small for any set-1 defect: one line naming the file, exit code 2."""
    from typer.testing import CliRunner

    from skullrec.cli import app
    from skullrec.io import write_nifti

    src = tmp_path / "in"
    blob = np.zeros((20, 20, 20), np.uint8)
    blob[8:11, 8:11, 8:11] = 1  # a 3-voxel cube: nothing like a vault to cut a defect into
    write_nifti(src / "tiny.nii.gz", blob, np.eye(4))
    result = CliRunner().invoke(app, ["prepare", "--in", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "tiny.nii.gz" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("spacing", [(0.6, 0.8, 1.1), (0.45, 0.45, 0.63), (2.0, 1.5, 0.9)])
@pytest.mark.parametrize("cval", [0.0, -20.0])
def test_restore_to_grid_separable_path_equals_scipy_affine_transform(spacing, cval) -> None:
    # predict's maps are axis-aligned (prepared_affine scales and shifts the source grid), so the
    # separable path runs; the general scipy path (fast=False) is the reference, for up- and
    # downsampling targets, an oblique affine and a logit map with cval != 0.
    rng = np.random.default_rng(seed_of_this_test())
    vol = Volume(_shell(), _oblique_affine(spacing))
    p, _ = P.prepare_volume(vol, size=24, margin_mm=3.0)
    prob = rng.random((24, 24, 24)).astype(np.float32) * 10 - 5
    fast = P.restore_to_grid(prob, p.affine, vol, cval=cval)
    ref = P.restore_to_grid(prob, p.affine, vol, cval=cval, fast=False)
    assert fast.dtype == ref.dtype == np.float32 and fast.shape == ref.shape == vol.shape
    np.testing.assert_allclose(fast, ref, rtol=0, atol=2e-5)
    assert (ref != cval).sum() > 0.3 * ref.size  # most target voxels are interpolated, not padding
    # a non-axis-aligned map (prepared grid rotated against the target) still goes through scipy
    rot = p.affine.copy()
    c, s = np.cos(0.3), np.sin(0.3)
    rot[:3, :3] = rot[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_array_equal(P.restore_to_grid(prob, rot, vol, cval=cval), P.restore_to_grid(prob, rot, vol, cval=cval, fast=False))
