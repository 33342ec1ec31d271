"""skullrec.data.defect_kinds: every named kind removes bone only, in its documented fraction and size
range, on its side of the midline, deterministically, and at one physical place whatever the spacing
or voxel order; the held-out kind stays out of stage-2 training unless asked for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from skullrec import cli
from skullrec.cli import app
from skullrec.data import synth
from skullrec.data.defect_kinds import DEFECT_KINDS, HELD_OUT_KIND, MIDLINE_MARGIN_MM, defect_generator, training_kinds
from skullrec.data.defects import set1_defect
from skullrec.data.stage2 import ALL_KINDS, check_kinds
from skullrec.errors import InputError
from skullrec.io import read_volume, write_nifti
from orientation_helpers import store_in_order as _store

KINDS = list(DEFECT_KINDS)
SEEDS = (0, 1, 2)


def _grid(s: float) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The synthetic skulls' field of view at an isotropic spacing of s mm (skull centred, as synth renders it)."""
    return tuple(int(math.ceil(f / s)) for f in synth.SOURCE_FOV_MM), (s, s, s)


G3, G25 = _grid(3.0), _grid(2.5)


@pytest.fixture(scope="module")
def skulls() -> list[np.ndarray]:
    return [synth.generate_skull(seed, *G3)[0] for seed in (10, 11)]


def _pieces_mm(removed: np.ndarray, affine: np.ndarray) -> list[np.ndarray]:
    """World (mm) voxel centres of each 26-connected piece of the removed bone, left-most (lowest canonical axis 0) first."""
    lab, n = ndimage.label(removed, structure=np.ones((3, 3, 3), bool))
    pieces = [np.argwhere(lab == i) for i in range(1, n + 1)]
    pieces.sort(key=lambda p: p[:, 0].mean())
    return [nib.affines.apply_affine(affine, p) for p in pieces]


def _principal_extent(points_mm: np.ndarray, voxel: float) -> float:
    """Extent (mm) of a point set along its first principal axis, voxel centres to voxel edges."""
    centred = points_mm - points_mm.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    proj = centred @ axis
    return float(proj.max() - proj.min()) + voxel


def _direction(complete: np.ndarray, points_vox: np.ndarray, spacing) -> tuple[float, float]:
    """Azimuth, elevation (degrees) of a point set's centroid from the bone's bounding-box centre (index frame, mm)."""
    idx = np.argwhere(complete)
    v = (points_vox.mean(0) - (idx.min(0) + idx.max(0)) / 2) * np.asarray(spacing)
    v /= np.linalg.norm(v)
    return math.degrees(math.atan2(v[1], v[0])), math.degrees(math.asin(v[2]))


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_removes_bone_in_its_fraction_and_size_range_on_its_side_of_the_midline(skulls, name: str) -> None:
    kind = DEFECT_KINDS[name]
    spacing = G3[1]
    aff = np.diag([*spacing, 1.0])  # the index frame in mm: axis 0 = left
    for complete in skulls:
        idx = np.argwhere(complete)
        x_mid = (idx[:, 0].min() + idx[:, 0].max()) / 2 * spacing[0]  # the mid-sagittal plane: the bone box's centre
        for seed in SEEDS:
            defective, params = kind(complete, spacing, np.random.default_rng(seed))
            assert defective.dtype == np.bool_ and defective.shape == complete.shape
            assert not (defective & ~complete).any()  # removes bone only
            removed = complete & ~defective
            frac = removed.sum() / complete.sum()
            assert kind.fraction[0] <= frac <= kind.fraction[1], (name, seed, frac)
            assert params["removed_voxels"] == removed.sum() and params["kind"] == name
            pieces = _pieces_mm(removed, aff)
            assert len(pieces) == kind.pieces, (name, seed, len(pieces))
            for pts in pieces:
                ext = _principal_extent(pts, spacing[0])
                # within the kind's size range, up to voxelisation (principal extent <= the Feret diameter)
                assert kind.size_mm[0] - 2 * spacing[0] <= ext <= kind.size_mm[1] + spacing[0], (name, seed, ext)
            xs = [p[:, 0] - x_mid for p in pieces]
            if kind.midline == "never":
                for x in xs:  # each piece wholly on one side, at least the margin away
                    assert x.min() >= MIDLINE_MARGIN_MM - 1e-6 or x.max() <= -MIDLINE_MARGIN_MM + 1e-6, (name, seed, x.min(), x.max())
            if kind.midline == "always":
                assert xs[0].min() <= -MIDLINE_MARGIN_MM and xs[0].max() >= MIDLINE_MARGIN_MM, (name, seed)
            if name == "bilateral":
                assert xs[0].max() < 0 < xs[1].min()  # one piece each side (sorted right, then left)
            if name == "lateral":
                assert (xs[0].min() > 0) == (params["side"] == "left")  # axis 0 points to the patient's left
            az, el = _direction(complete, np.argwhere(removed), spacing)
            if name == "fronto-orbital":  # anterior (azimuth -90) and low on the forehead
                assert abs(az + 90) <= 45 and el < 25, (seed, az, el)
            if name in ("vault-round", "vault-irregular", "midline"):
                assert el > 15, (name, seed, el)  # the removed bone's centroid lies a little inside the shell


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_is_deterministic_for_a_seed_and_varies_with_it(skulls, name: str) -> None:
    complete = skulls[0]
    a, pa = DEFECT_KINDS[name](complete, G3[1], np.random.default_rng(7))
    b, pb = DEFECT_KINDS[name](complete, G3[1], np.random.default_rng(7))
    c, _ = DEFECT_KINDS[name](complete, G3[1], np.random.default_rng(8))
    assert a.tobytes() == b.tobytes() and json.dumps(pa) == json.dumps(pb)
    assert a.tobytes() != c.tobytes()


def test_small_and_large_kinds_differ_in_size_as_documented(skulls) -> None:
    """The size ranges are real: small defects are all under 31 mm, vault defects reach beyond 60 mm."""
    small = [max(DEFECT_KINDS["small"](skulls[0], G3[1], np.random.default_rng(s))[1]["extent_mm"]) for s in range(6)]
    vault = [max(DEFECT_KINDS["vault-round"](skulls[0], G3[1], np.random.default_rng(s))[1]["extent_mm"]) for s in range(6)]
    assert max(small) <= 30 + 3.0 and min(small) >= 10 - 3.0
    assert max(vault) > 60 and min(vault) >= 30 - 3.0


@pytest.mark.parametrize("name", KINDS)
def test_the_same_skull_at_another_spacing_gets_the_same_physical_defect(name: str) -> None:
    centroids = []
    for shape, spacing in (G3, G25):
        complete = synth.generate_skull(10, shape, spacing)[0]
        defective, _ = DEFECT_KINDS[name](complete, spacing, np.random.default_rng(1))
        pieces = _pieces_mm(complete & ~defective, synth.source_affine(shape, spacing))  # world mm, skull centred in both
        centroids.append(np.array([p.mean(0) for p in pieces]))
    assert centroids[0].shape == centroids[1].shape
    assert np.linalg.norm(centroids[0] - centroids[1], axis=1).max() < 4.0, (name, centroids)


def test_any_voxel_order_read_back_gets_the_defect_at_the_same_world_place(tmp_path: Path, skulls) -> None:
    complete = skulls[1].astype(np.uint8)
    aff = synth.source_affine(*G3)
    orders = [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False))]
    for name in ("lateral", "fronto-orbital", "bilateral"):
        ref = None
        for k, (perm, flips) in enumerate(orders):
            data, affine = _store(complete, aff, perm, flips)
            path = write_nifti(tmp_path / f"{name}{k}.nii.gz", data, affine)
            vol = read_volume(path)
            defective, _ = DEFECT_KINDS[name](vol.data.astype(bool), vol.spacing, np.random.default_rng(4))
            cents = np.array([p.mean(0) for p in _pieces_mm(vol.data.astype(bool) & ~defective, vol.affine)])
            if ref is None:
                ref = cents
            np.testing.assert_allclose(cents, ref, atol=1e-3, err_msg=f"{name} {perm} {flips}")
        # The check has teeth: the flipped, permuted array taken as it is puts the defect elsewhere.
        data, affine = _store(complete, aff, *orders[1])
        sp = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        raw, _ = DEFECT_KINDS[name](data.astype(bool), sp, np.random.default_rng(4))
        raw_cents = np.array([p.mean(0) for p in _pieces_mm(data.astype(bool) & ~raw, affine)])
        assert raw_cents.shape != ref.shape or np.linalg.norm(raw_cents - ref, axis=1).max() > 20.0


def test_registry_held_out_kind_and_kind_checks() -> None:
    assert HELD_OUT_KIND in DEFECT_KINDS
    assert set(training_kinds()) == set(DEFECT_KINDS) - {HELD_OUT_KIND} and len(training_kinds()) == len(DEFECT_KINDS) - 1
    assert defect_generator("set1") is set1_defect and defect_generator("small") is DEFECT_KINDS["small"]
    # the command line's help names exactly the kinds stage 2 accepts (written out there to keep --help light)
    assert cli.KIND_NAMES.split(", ") == list(ALL_KINDS) and cli.HELD_OUT == HELD_OUT_KIND
    assert check_kinds(("set1", "lateral"), training=True) == ("set1", "lateral")
    with pytest.raises(InputError, match="held-out kind.*--allow-held-out"):
        check_kinds(("set1", HELD_OUT_KIND), training=True)
    assert check_kinds((HELD_OUT_KIND,), training=True, allow_held_out=True) == (HELD_OUT_KIND,)
    assert check_kinds((HELD_OUT_KIND,), training=False) == (HELD_OUT_KIND,)  # evaluation sets may use it
    with pytest.raises(InputError, match="unknown kind 'round'"):
        check_kinds(("round",), training=False)
    with pytest.raises(InputError, match="lateral given twice"):
        check_kinds(("lateral", "set1", "lateral"), training=False)


def test_prepare_eval_cuts_named_kinds_seeded_per_case_and_kind(tmp_path: Path) -> None:
    from skullrec.data.layout import write_manifest

    aff = synth.source_affine(*G3)
    for cid, seed in (("a", 3), ("b", 4)):
        write_nifti(tmp_path / "complete" / f"{cid}.nii.gz", synth.generate_skull(seed, *G3)[0], aff)
    write_manifest(tmp_path / "prepared", [], {"train_ids": ["a"], "eval_ids": ["b"], "complete_folder": str(tmp_path / "complete"),
                                               "defective_folder": None})
    res = CliRunner().invoke(app, ["prepare-eval", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "ev"),
                                   "--kinds", f"lateral,{HELD_OUT_KIND}"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert meta["held_out_kind"] == HELD_OUT_KIND
    assert [(c["kind"], c["held_out"]) for c in meta["cases"]] == [("lateral", False), (HELD_OUT_KIND, True)]
    complete = read_volume(tmp_path / "ev" / "complete" / "b.nii.gz").data.astype(bool)
    for kind in ("lateral", HELD_OUT_KIND):
        imp = read_volume(tmp_path / "ev" / kind / "implant" / "b.nii.gz").data.astype(bool)
        frac = imp.sum() / complete.sum()
        assert DEFECT_KINDS[kind].fraction[0] <= frac <= DEFECT_KINDS[kind].fraction[1]
    # Seeded by (seed, case, kind): the same lateral defect when asked alone, from worker processes.
    again = CliRunner().invoke(app, ["prepare-eval", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "ev2"),
                                     "--kinds", "lateral", "--workers", "2"])
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(read_volume(tmp_path / "ev2" / "lateral" / "implant" / "b.nii.gz").data,
                                  read_volume(tmp_path / "ev" / "lateral" / "implant" / "b.nii.gz").data)
    other = CliRunner().invoke(app, ["prepare-eval", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "ev3"),
                                     "--kinds", "lateral", "--seed", "1"])
    assert other.exit_code == 0
    assert not np.array_equal(read_volume(tmp_path / "ev3" / "lateral" / "implant" / "b.nii.gz").data,
                              read_volume(tmp_path / "ev" / "lateral" / "implant" / "b.nii.gz").data)


def test_prepare_implant_refuses_the_held_out_kind_unless_allowed(tmp_path: Path) -> None:
    from skullrec.config import config_from_dict
    from skullrec.data.layout import write_manifest
    from skullrec.inference.samples import build_stage2_data
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    aff = synth.source_affine(*G3)
    write_nifti(tmp_path / "complete" / "a.nii.gz", synth.generate_skull(3, *G3)[0], aff)
    write_manifest(tmp_path / "prepared", [], {"train_ids": ["a"], "eval_ids": ["b"], "complete_folder": str(tmp_path / "complete"),
                                               "defective_folder": None})
    cfg = config_from_dict({"model": {"size": 32, "channels": [2, 2, 2, 2, 2]}})
    stage1 = save_checkpoint(tmp_path / "s1.safetensors", build_model(cfg.model, seed=0), cfg, epoch=0)
    res = CliRunner().invoke(app, ["prepare-implant", "--prepared", str(tmp_path / "prepared"), "--stage1", str(stage1),
                                   "--out", str(tmp_path / "s"), "--kinds", f"small,{HELD_OUT_KIND}", "--grid", "16", "--box-mm", "96"])
    assert res.exit_code == 2 and "--allow-held-out" in res.stderr and not (tmp_path / "s").exists()
    recs = build_stage2_data(tmp_path / "prepared", stage1, tmp_path / "s", kinds=("small", HELD_OUT_KIND), box_mm=96.0, grid=16,
                             allow_held_out=True)
    assert [r["kind"] for r in recs] == ["small", HELD_OUT_KIND] and all(r["implant_voxels"] > 0 for r in recs)
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["held_out_kind"] == HELD_OUT_KIND and meta["held_out_kind_used"] is True
    assert (tmp_path / "s" / f"a_{HELD_OUT_KIND}.npz").is_file()


@pytest.mark.real
def test_on_a_real_skullfix_skull_every_kind_is_one_physical_defect_at_two_resolutions() -> None:
    """SkullFix 000 at about 0.9 x 0.9 x 1.3 mm and 1.8 x 1.8 x 1.9 mm (strides of the same scan): the same defect, in range."""
    from conftest import SKULLFIX_TRAINING

    path = SKULLFIX_TRAINING / "complete_skull" / "000.nrrd"
    if not path.is_file():
        pytest.skip("SkullFix data not available (../shared)")
    vol = read_volume(path)
    grids = []
    for stride in ((2, 2, 2), (4, 4, 3)):
        mask = vol.data[:: stride[0], :: stride[1], :: stride[2]].astype(bool)
        grids.append((mask, tuple(s * k for s, k in zip(vol.spacing, stride)), vol.affine @ np.diag([*stride, 1.0])))
    for name, kind in DEFECT_KINDS.items():
        centroids = []
        for mask, spacing, affine in grids:
            defective, params = kind(mask, spacing, np.random.default_rng(1))
            frac = (mask & ~defective).sum() / mask.sum()
            assert kind.fraction[0] <= frac <= kind.fraction[1], (name, frac)
            assert all(kind.size_mm[0] - max(spacing) <= e <= kind.size_mm[1] + max(spacing) for e in params["extent_mm"]), (name, params["extent_mm"])
            centroids.append(np.array([p.mean(0) for p in _pieces_mm(mask & ~defective, affine)]))
        assert centroids[0].shape == centroids[1].shape, name
        assert np.linalg.norm(centroids[0] - centroids[1], axis=1).max() < 3.0, (name, centroids)


def test_the_held_out_kind_removes_bone_where_the_training_kinds_seldom_do(skulls) -> None:
    """The low forehead (azimuth -90 +- 30, elevation -20..5 from the bone box's centre) is the held-out kind's, not training's."""
    complete = skulls[0]
    idx = np.argwhere(complete)
    centre = (idx.min(0) + idx.max(0)) / 2

    def share_in_zone(removed: np.ndarray) -> float:
        v = (np.argwhere(removed) - centre) * np.asarray(G3[1])
        az = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
        el = np.degrees(np.arcsin(v[:, 2] / np.linalg.norm(v, axis=1)))
        return float(((az > -120) & (az < -60) & (el > -20) & (el < 5)).mean())

    share = {name: np.mean([share_in_zone(complete & ~DEFECT_KINDS[name](complete, G3[1], np.random.default_rng(s))[0])
                            for s in range(10)]) for name in KINDS}
    assert share[HELD_OUT_KIND] > 0.3, share
    assert max(share[k] for k in training_kinds()) < 0.05, share
