"""predict's printable outputs: STL meshes in LPS mm that land where ITK / 3D Slicer place the volume
written beside them (RAS NIfTI, LPS NRRD, a NIfTI and a NRRD without orientation), outputs in the
input's format, every printed warning in predict.json, one file as --in, and meshes a printer takes
(watertight, one shell, smoothing within 0.5 mm) on a real SkullFix implant."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from skullrec import config
from skullrec.inference import mesh as M
from skullrec.inference.predict import predict_folder
from skullrec.io import Volume, read_volume, write_volume

from test_predict import SIZE, _oracle, _skull_pair  # noqa: E402  (tests/inference is on sys.path)

SPACING = (0.9, 1.1, 1.4)


def _stl_vertices(path: Path) -> np.ndarray:
    """Vertices of a binary STL, parsed with struct (independent of the writer)."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<I", raw, 80)
    assert len(raw) == 84 + 50 * n
    rec = np.frombuffer(raw[84:], dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]), count=n)
    return rec["v"].reshape(-1, 3).astype(np.float64)


def _write_nrrd(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    m = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]  # RAS -> LPS
    sp = np.linalg.norm(m, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.uint8))
    img.SetSpacing(sp.tolist())
    img.SetDirection((m / sp).ravel().tolist())
    img.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    sitk.WriteImage(img, str(path), useCompression=True)


def _write_bare_nrrd(path: Path, data: np.ndarray) -> None:
    """A NRRD with spacings but no space, space directions or origin (ITK: identity directions, origin 0)."""
    head = (f"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: {' '.join(map(str, data.shape))}\n"
            f"spacings: {' '.join(map(str, SPACING))}\nencoding: raw\n\n")
    path.write_bytes(head.encode() + np.asarray(data, np.uint8).tobytes(order="F"))


def _write_bare_nifti(path: Path, data: np.ndarray) -> None:
    hdr = nib.Nifti1Header()  # qform and sform codes 0
    hdr.set_data_shape(data.shape)
    hdr.set_zooms(SPACING)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), None, hdr), str(path))


def _run(tmp_path: Path, name: str, write, complete: Volume, defective: Volume, monkeypatch, **kw):
    """predict_folder on one input file written by ``write``, with the oracle model; returns (out, warnings said)."""
    from skullrec.nets import checkpoint

    model = _oracle(complete, defective)
    cfg = config.config_from_dict({"model": {"size": SIZE}})
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, device="cpu": (model, cfg, {}))
    src = tmp_path / "in" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    write(src)
    said: list[str] = []
    out = tmp_path / "out"
    predict_folder(tmp_path / "fake.safetensors", src, out, stl=True, device="cpu", warn=said.append, **kw)
    return out, src, said


def _surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Indices of mask voxels with a background 6-neighbour."""
    mask = mask.astype(bool)
    return np.argwhere(mask & ~ndi.binary_erosion(mask))


CASES = ["ras_nifti", "lps_nrrd", "unoriented_nifti", "unoriented_nrrd"]


@pytest.mark.parametrize("kind", CASES)
def test_stl_lands_where_itk_places_the_volume_written_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    complete, defective = _skull_pair()
    if kind.startswith("unoriented"):
        # What skullrec reads such a file as: axis 0 left, 1 posterior, 2 superior, origin 0.
        aff = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        complete, defective = Volume(complete.data, aff), Volume(defective.data, aff)
    flip = defective.data[::-1]  # stored in another voxel order than the canonical one: R, P, S
    flip_aff = defective.affine @ np.array([[-1, 0, 0, defective.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    writers = {
        "ras_nifti": ("case.nii.gz", lambda p: nib.save(nib.Nifti1Image(flip, flip_aff), str(p))),
        "lps_nrrd": ("case.nrrd", lambda p: _write_nrrd(p, flip, flip_aff)),
        "unoriented_nifti": ("case.nii", lambda p: _write_bare_nifti(p, defective.data)),
        "unoriented_nrrd": ("case.nrrd", lambda p: _write_bare_nrrd(p, defective.data)),
    }
    name, write = writers[kind]
    out, src, said = _run(tmp_path, name, write, complete, defective, monkeypatch)
    ext = ".nrrd" if name.endswith(".nrrd") else ".nii.gz"
    written = out / "implant" / f"case{ext}"
    assert written.is_file() and not (out / "stl" / "case_complete.stl").exists()  # implant only by default
    stl = out / "stl" / "case_implant.stl"
    assert stl.read_bytes()[:80].rstrip() == b"skullrec case implant SPACE=LPS mm"
    verts = _stl_vertices(stl)
    tree = cKDTree(verts)

    # The known points: surface voxels of the written implant, in the file's own voxel order, placed
    # in LPS mm by ITK (what 3D Slicer uses to load NIfTI and NRRD).
    img = sitk.ReadImage(str(written))
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (x, y, z) = ITK index order
    idx = _surface_voxels(arr)
    assert len(idx) > 50
    pick = idx[np.random.default_rng(0).choice(len(idx), 40, replace=False)]
    lps = np.array([img.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in pick])
    d, _ = tree.query(lps)
    assert d.max() <= max(SPACING), d.max()  # within a voxel (marching cubes: half a voxel off the centres)
    # Teeth: the same points in RAS (the frame the STL used to be in) are far from the mesh.
    far, _ = tree.query(lps * [-1.0, -1.0, 1.0])
    assert far.min() > 10.0, far.min()
    if kind == "unoriented_nifti":
        hdr = nib.load(str(written)).header
        assert int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0  # outputs keep "no orientation"
        report = json.loads((out / "predict.json").read_text())
        orient = [w for w in said if "stores no orientation" in w]
        assert len(orient) == 1  # printed once ...
        assert report["cases"][0]["warnings"][0] == orient[0] and orient[0] in report["warnings"]  # ... and recorded


def test_nrrd_output_keeps_the_input_grid_and_reads_back_the_same(tmp_path: Path) -> None:
    _, defective = _skull_pair()
    flip = np.ascontiguousarray(np.transpose(defective.data[::-1], (1, 0, 2)))  # another voxel order: axes swapped, one flipped
    perm = np.array([[0, -1, 0, defective.shape[0] - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    _write_nrrd(tmp_path / "in.nrrd", flip, defective.affine @ perm)
    vol = read_volume(tmp_path / "in.nrrd")
    np.testing.assert_array_equal(vol.data, defective.data)  # canonical on reading
    result = vol.like((1 - vol.data).astype(np.uint8))
    write_volume(tmp_path / "out.nrrd", result)
    a, b = sitk.ReadImage(str(tmp_path / "in.nrrd")), sitk.ReadImage(str(tmp_path / "out.nrrd"))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), 1 - sitk.GetArrayFromImage(a))  # the file's own voxel order
    back = read_volume(tmp_path / "out.nrrd")
    np.testing.assert_array_equal(back.data, result.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)


def test_one_file_as_input_and_smooth_needs_stl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skullrec.errors import InputError

    complete, defective = _skull_pair()
    out, src, said = _run(tmp_path, "one.nrrd", lambda p: _write_nrrd(p, defective.data, defective.affine), complete, defective,
                          monkeypatch, smooth=True)
    report = json.loads((out / "predict.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == ["one"] and report["input"] == str(src)
    assert sorted(p.name for p in (out / "implant").iterdir()) == ["one.nrrd"]
    assert report["stl"]["smooth"] is True and report["cases"][0]["implant_stl_pieces"] >= 1
    with pytest.raises(InputError, match="--smooth"):
        predict_folder(tmp_path / "fake.safetensors", src, tmp_path / "o2", smooth=True, device="cpu")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt: unknown file type"):
        predict_folder(tmp_path / "fake.safetensors", tmp_path / "notes.txt", tmp_path / "o3", device="cpu")


def test_plausibility_warnings_are_printed_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The ellipsoid is ~60 mm across: outside the usual skull range, so predict warns; the warning
    # must be in predict.json exactly as printed (it used to hold the bare text, reading warnings not at all).
    complete, defective = _skull_pair()
    out, src, said = _run(tmp_path, "w.nii.gz", lambda p: nib.save(nib.Nifti1Image(defective.data, defective.affine), str(p)),
                          complete, defective, monkeypatch)
    report = json.loads((out / "predict.json").read_text())
    assert said and said == report["warnings"] == report["cases"][0]["warnings"]
    assert any("outside the usual" in w for w in said)


def test_printable_mesh_of_a_real_implant_is_one_watertight_shell_and_smoothing_stays_within_half_a_mm() -> None:
    import trimesh
    from conftest import SKULLFIX_TRAINING

    path = SKULLFIX_TRAINING / "implant" / "000.nrrd"
    if not path.is_file():
        pytest.skip("SkullFix training set not available (../shared)")
    vol = read_volume(path)
    frame = M.lps_affine(vol.affine)
    raw_v, raw_f = M.mesh_from_mask(vol.data, frame)
    # SkullFix's own implant encloses a few tiny voids: meshed as they are, they are inner shells.
    assert trimesh.Trimesh(raw_v, raw_f, process=False).body_count > 1
    verts, faces = M.printable_mesh(vol.data, frame)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.body_count == 1
    mm3 = vol.data.sum() * abs(np.linalg.det(vol.affine[:3, :3]))
    assert mesh.volume > 0 and abs(mesh.volume - mm3) / mm3 < 0.01  # outward, and the implant's volume in mm^3
    smooth_v, smooth_f = M.printable_mesh(vol.data, frame, smooth=True)
    np.testing.assert_array_equal(smooth_f, faces)
    smoothed = trimesh.Trimesh(smooth_v, smooth_f, process=False)
    assert smoothed.is_watertight and smoothed.body_count == 1
    # Distance of each smoothed vertex to the unsmoothed surface, bounded above by the distance to its
    # nearest unsmoothed vertex (every vertex of the unsmoothed mesh lies on that surface).
    dist, _ = cKDTree(verts).query(smooth_v)
    assert dist.max() <= M.MAX_SMOOTH_SHIFT_MM + 1e-9, dist.max()
    moved = np.linalg.norm(smooth_v - verts, axis=1)
    assert moved.mean() > 0.05  # it did smooth: the staircase is gone ...
    assert smoothed.area < 0.95 * mesh.area  # ... so the surface is markedly smaller
    assert abs(smoothed.volume - mesh.volume) / mesh.volume < 0.02  # Taubin: no shrinking


def test_smoothing_is_capped_even_where_taubin_would_move_further() -> None:
    # A single voxel's cube: Taubin pulls its corners in by more than 0.5 mm at 4 mm voxels; the cap holds them.
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[1, 1, 1] = 1
    verts, faces = M.mesh_from_mask(mask, np.diag([4.0, 4.0, 4.0, 1.0]))
    free = M.smooth_mesh(verts, faces, max_shift_mm=np.inf)
    capped = M.smooth_mesh(verts, faces)
    assert np.linalg.norm(free - verts, axis=1).max() > 0.5
    np.testing.assert_allclose(np.linalg.norm(capped - verts, axis=1).max(), 0.5, atol=1e-9)


def test_evaluate_and_the_viewer_find_nrrd_predictions_by_case_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skullrec.evaluation.evaluate import evaluate_folders
    from skullrec.viewer import helpers as V

    complete, defective = _skull_pair()
    out, src, _ = _run(tmp_path, "007.nrrd", lambda p: _write_nrrd(p, defective.data, defective.affine), complete, defective, monkeypatch)
    assert (out / "implant" / "007.nrrd").is_file()
    # Truth as NIfTI, prediction as NRRD: paired by case id, on the same grid.
    truth = tmp_path / "truth"
    write_volume(truth / "007.nii.gz", complete)
    rows, summary = evaluate_folders(out / "complete", truth)
    assert [r["case"] for r in rows] == ["007"] and 0.5 < rows[0]["dsc"] <= 1.0
    # The viewer's data-set layout with NRRD files in it: found and read by case id.
    ds = tmp_path / "ds" / "eval"
    for kind, path in (("defective", src), ("complete", out / "complete" / "007.nrrd"), ("implant", out / "implant" / "007.nrrd")):
        (ds / kind).mkdir(parents=True)
        (ds / kind / "007.nrrd").write_bytes(path.read_bytes())
    case = V.load_case(tmp_path / "ds", "eval", "007")
    np.testing.assert_array_equal(case.implant.data, read_volume(out / "implant" / "007.nrrd").data)
    assert case.implant.data.any() and V.find_case(tmp_path / "ds", "7") == ("eval", "007")


def test_format_chooses_the_output_volumes_whatever_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    complete, defective = _skull_pair()
    nifti = lambda p: nib.save(nib.Nifti1Image(defective.data, defective.affine), str(p))  # noqa: E731
    out_auto, _, _ = _run(tmp_path / "a", "one.nii.gz", nifti, complete, defective, monkeypatch)
    out_nrrd, _, _ = _run(tmp_path / "b", "one.nii.gz", nifti, complete, defective, monkeypatch, out_format="nrrd")
    assert sorted(p.name for p in (out_auto / "implant").iterdir()) == ["one.nii.gz"]
    assert sorted(p.name for p in (out_nrrd / "implant").iterdir()) == ["one.nrrd"]
    a, b = read_volume(out_auto / "implant" / "one.nii.gz"), read_volume(out_nrrd / "implant" / "one.nrrd")
    np.testing.assert_array_equal(a.data, b.data)  # the same implant on the same grid, in the other format
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert a.data.any()
    out_nifti, _, _ = _run(tmp_path / "c", "one.nrrd", lambda p: _write_nrrd(p, defective.data, defective.affine),
                           complete, defective, monkeypatch, out_format="nifti")
    assert sorted(p.name for p in (out_nifti / "complete").iterdir()) == ["one.nii.gz"]
