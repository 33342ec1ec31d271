"""skullrec.data.synth: seeded procedural skulls are one piece, hollow, skull-sized, and the data set is complete."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.data import synth
from skullrec.data.resample import prepare_volume
from skullrec.io import Volume

GRID64 = synth.source_grid(64)  # (112, 144, 112) voxels of 1.5 mm
SMALL = synth.source_grid(32)  # (56, 72, 56) voxels of 3 mm: fast CLI runs
SIX = ndimage.generate_binary_structure(3, 1)

# Bone fraction of a skull prepared to 64^3 (partial-volume rule of skullrec.data.resample): the range
# the generator is held to. Real SkullFix complete skulls prepared the same way: see docs/explanation/synthetic-data.md.
BONE_FRACTION_64 = (0.10, 0.17)


@pytest.fixture(scope="module")
def skulls() -> list[tuple[np.ndarray, dict]]:
    return [synth.generate_skull(seed, *GRID64) for seed in (0, 1, 2)]


def _bbox_mm(mask: np.ndarray, spacing) -> np.ndarray:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return np.array([(i[-1] - i[0] + 1) * s for i, s in zip(idx, spacing)])


def test_same_seed_same_bytes_different_seed_different_skull() -> None:
    a, pa = synth.generate_skull(7, *SMALL)
    b, pb = synth.generate_skull(np.random.default_rng(7), *SMALL)
    assert a.dtype == np.bool_ and a.shape == SMALL[0]
    assert a.tobytes() == b.tobytes()
    assert json.dumps(pa) == json.dumps(pb)
    c, pc = synth.generate_skull(8, *SMALL)
    assert pc != pa
    assert (a ^ c).sum() > 0.05 * a.sum()


def test_coarse_to_fine_render_equals_voxelwise_evaluation(monkeypatch: pytest.MonkeyPatch, skulls) -> None:
    monkeypatch.setattr(synth, "MIN_FEATURE_MM", 0.0)  # every grid counts as coarse: voxel-by-voxel path
    for complete, params in skulls:
        direct = synth.render(params, *GRID64)
        np.testing.assert_array_equal(direct, complete)


def test_one_piece_with_6_connectivity(skulls) -> None:
    for complete, _ in skulls:
        _, n = ndimage.label(complete, structure=SIX)
        assert n == 1


def test_vault_is_hollow_and_encloses_an_adult_cranial_cavity(skulls) -> None:
    """With the foramen magnum closed the interior is a separate background component of 1.0-1.8 litres."""
    spacing = GRID64[1]
    for complete, params in skulls:
        # as generated, the cavity opens through the foramen magnum: fill_holes adds (almost) nothing
        assert (ndimage.binary_fill_holes(complete) & ~complete).sum() * np.prod(spacing) < 20_000  # mm^3
        closed = synth.render({**params, "foramen_radii": [1e-3, 1e-3]}, *GRID64)
        cavity = ndimage.binary_fill_holes(closed) & ~closed
        litres = cavity.sum() * np.prod(spacing) / 1e6
        assert 1.0 < litres < 1.8, litres
        # the cavity is one background component that does not touch the grid border
        lab, n = ndimage.label(cavity, structure=SIX)
        sizes = np.bincount(lab.ravel())[1:]
        assert sizes.max() > 0.95 * sizes.sum()


def test_skull_size_thickness_and_bone_fraction_are_plausible(skulls) -> None:
    shape, spacing = GRID64
    for complete, params in skulls:
        width, length, height = _bbox_mm(complete, spacing)
        # adult skull: ~140 mm wide, ~180 mm long; SkullFix-like height (vertex to field-of-view cut)
        assert 120 < width < 160 and 160 < length < 205 and 120 < height < 155, (width, length, height)
        # mean bone thickness: a slab of thickness t has mean surface distance t/4 (minus half a voxel)
        edt = ndimage.distance_transform_edt(np.pad(complete, 1), sampling=spacing)
        thickness = 4 * (edt[edt > 0].mean() - 0.5 * spacing[0])
        assert 4.0 < thickness < 7.5, thickness
        # left-right symmetric up to the small pose and asymmetry: mirrored overlap is high
        c = np.round(np.argwhere(complete).mean(axis=0)).astype(int)
        half = min(c[0], shape[0] - 1 - c[0])
        part = complete[c[0] - half : c[0] + half + 1]
        dice = 2 * (part & part[::-1]).sum() / (2 * part.sum())
        assert dice > 0.6, dice
        prepared, _ = prepare_volume(Volume(complete.astype(np.uint8), synth.source_affine(shape, spacing)), 64)
        fraction = prepared.data.mean()
        assert BONE_FRACTION_64[0] < fraction < BONE_FRACTION_64[1], fraction
        _, n = ndimage.label(prepared.data, structure=np.ones((3, 3, 3)))
        assert n == 1


def test_skullfix_orientation_top_is_high_index_face_is_anterior(skulls) -> None:
    """Axis 2 superior (the vertex is at high z), axis 1 posterior (the face is at low y)."""
    shape, spacing = GRID64
    complete, params = skulls[1]
    idx = np.argwhere(complete)
    lo, hi = idx.min(0), idx.max(0)
    # the top 10 % of the skull's height is a cap narrower than the skull's width (a vault, not a base)
    top = idx[idx[:, 2] > hi[2] - 0.1 * (hi[2] - lo[2])]
    assert np.ptp(top[:, 0]) < 0.8 * (hi[0] - lo[0])
    # the lowest 10 %: the face (orbits) lies in front, so bone there sits at low y
    low = idx[idx[:, 2] < lo[2] + 0.1 * (hi[2] - lo[2])]
    assert low[:, 1].mean() < (lo[1] + hi[1]) / 2
    aff = synth.source_affine(shape, spacing)
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    np.testing.assert_allclose(aff @ np.r_[(np.array(shape) - 1) / 2, 1], [0, 0, 0, 1], atol=1e-9)


def test_cases_are_reproducible_one_by_one() -> None:
    """Case i of a data set depends only on (seed, i), not on how many cases are made."""
    a = synth.make_case(3, 5, *SMALL, sets=(1, 2))
    b = synth.make_case(3, 5, *SMALL, sets=(1, 2))
    c = synth.make_case(3, 6, *SMALL, sets=(1,))
    assert a[0].tobytes() == b[0].tobytes()
    assert a[2][1][0].tobytes() == b[2][1][0].tobytes() and a[2][2][0].tobytes() == b[2][2][0].tobytes()
    assert a[0].tobytes() != c[0].tobytes()


runner = CliRunner()


def test_synth_command_writes_the_layout_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    res = runner.invoke(app, ["synth", "--out", str(out), "--n-train", "2", "--n-eval", "1", "--size", "32", "--seed", "4"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["meta"]["seed"] == 4 and manifest["meta"]["size"] == 32
    by_split: dict[str, list] = {}
    for rec in manifest["cases"]:
        by_split.setdefault(rec["split"], []).append(rec)
        assert rec["source"] == "synthetic"
        assert set(rec["shape_params"]) >= {"half_width", "front", "back", "up", "thickness", "rotation_deg"}
        assert rec["defect"]["removed_voxels"] > 0
    assert {s: len(v) for s, v in by_split.items()} == {"train": 2, "eval_set1": 1, "eval_set2": 1}
    assert by_split["eval_set1"][0]["case_id"] == by_split["eval_set2"][0]["case_id"]
    assert by_split["eval_set1"][0]["defect"]["set"] == 1 and by_split["eval_set2"][0]["defect"]["set"] == 2
    for rec in manifest["cases"]:
        files = {k: out / rec["split"] / k / f"{rec['case_id']}.nii.gz" for k in ("complete", "defective", "implant")}
        vols = {k: np.asarray(nib.load(str(p)).dataobj) for k, p in files.items()}
        assert vols["complete"].shape == (32, 32, 32)
        assert not (vols["defective"] & ~vols["complete"]).any()
        np.testing.assert_array_equal(vols["implant"], vols["complete"] & (1 - vols["defective"]))
        assert int(vols["implant"].sum()) == rec["implant_voxels"] > 0
    # same seed, same data; the old folder is replaced only with --overwrite
    again = tmp_path / "again"
    assert runner.invoke(app, ["synth", "--out", str(again), "--n-train", "2", "--n-eval", "1", "--size", "32", "--seed", "4"]).exit_code == 0
    for p in out.rglob("*.nii.gz"):
        q = again / p.relative_to(out)
        np.testing.assert_array_equal(np.asarray(nib.load(str(p)).dataobj), np.asarray(nib.load(str(q)).dataobj))
    assert json.loads((again / "manifest.json").read_text())["cases"] == manifest["cases"]


def test_synth_refuses_a_non_empty_output_and_bad_counts(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    res = runner.invoke(app, ["synth", "--out", str(out), "--n-train", "1", "--n-eval", "0", "--size", "32"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "--overwrite" in res.output and str(out) in res.output
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--n-train", "-1"])
    assert res.exit_code == 2 and "--n-train" in res.output
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "y"), "--n-train", "0", "--n-eval", "0"])
    assert res.exit_code == 2 and res.output.startswith("error:")
    res = runner.invoke(app, ["synth", "--out", str(out), "--n-train", "1", "--n-eval", "0", "--size", "32", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_plain_skull_has_the_parameter_sizes_in_mm() -> None:
    """No shape noise, no pose: vertex height and vault half-width in world mm equal the parameters."""
    shape, spacing = GRID64
    p = synth.sample_params(1)
    p.update(shape_coef=[0.0] * len(p["shape_coef"]), asymmetry=0.0, rotation_deg=[0.0, 0.0, 0.0], shift_mm=[0.0, 0.0, 0.0])
    skull = synth.render(p, shape, spacing)
    aff = synth.source_affine(shape, spacing)
    world = lambda ijk: (aff @ np.r_[ijk, 1.0])[:3]  # noqa: E731
    idx = np.argwhere(skull)
    lo, hi = idx.min(0), idx.max(0)
    vertex_z = p["up"]  # head frame: the vault centre is z = 0
    cut_z = vertex_z - p["cut_height_mm"]
    height = (hi[2] - lo[2] + 1) * spacing[2]
    assert height == pytest.approx(vertex_z - cut_z, abs=2 * spacing[2])
    # the widest point of the vault (at the vault centre's height) is 2 * half_width across
    z_centre = lo[2] + (0.0 - cut_z) / spacing[2]  # index of head z = 0
    row = skull[:, :, int(round(z_centre))]
    xs = np.flatnonzero(row.any(axis=1))
    width = (xs[-1] - xs[0] + 1) * spacing[0]
    assert width == pytest.approx(2 * p["half_width"], abs=2 * spacing[0])
    # axis 0 points to the patient's left: world x (RAS, +right) decreases along it
    assert world([1, 0, 0])[0] < world([0, 0, 0])[0]
