"""skullrec.inference.predict: reconstruction back on the input grid, implant derivation, STL meshes in mm, the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import seed_of_this_test
from scipy import ndimage as ndi
from typer.testing import CliRunner

from skullrec.cli import app, predict_command
from skullrec.data import resample as P
from skullrec.inference import mesh as M
from skullrec.inference import predict as Q
from skullrec.io import Volume, read_volume, write_nifti

SIZE = 32


def _affine() -> np.ndarray:
    a = np.deg2rad(12)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1, -1, 1]) @ rot @ np.diag([0.9, 1.1, 1.4])  # anisotropic, oblique, RAS from LPS-like
    aff[:3, 3] = [60.0, 45.0, -20.0]
    return aff


def _skull_pair(shape=(61, 53, 41)) -> tuple[Volume, Volume]:
    """An odd-shaped ellipsoidal shell and the same shell with a cap removed (the defect)."""
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 26) ** 2 + (g[1] / 22) ** 2 + (g[2] / 17) ** 2)
    complete = ((r <= 1) & (r >= 0.86)).astype(np.uint8)
    defective = complete.copy()
    defective[18:44, 16:38, 30:] = 0
    hdr = nib.Nifti1Header()
    hdr["descrip"] = b"input header"
    return Volume(complete, _affine(), hdr), Volume(defective, _affine(), hdr, Path("case.nii.gz"))


class OracleModel(torch.nn.Module):
    """Stands in for the autoencoder: returns the true complete skull (prepared on the input's box) as logits."""

    size = SIZE

    def __init__(self, complete: Volume, empty: bool = False) -> None:
        super().__init__()
        self.complete, self.empty, self.calls = complete, empty, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        assert x.dtype == torch.float32 and set(torch.unique(x).tolist()) <= {0.0, 1.0}
        if self.empty:  # the defective skull itself: a reconstruction that adds no bone (empty implant)
            return torch.where(x > 0, 10.0, -10.0)
        out = []
        for xi in x:
            # Recover the box from the input itself: the oracle knows the complete skull at source.
            c64, _ = P.prepare_volume(self.complete, SIZE, box=self._box)
            out.append(torch.from_numpy(np.where(c64.data > 0, 10.0, -10.0).astype(np.float32))[None])
        return torch.stack(out)


def _oracle(complete: Volume, defective: Volume, empty: bool = False) -> OracleModel:
    m = OracleModel(complete, empty)
    m._box = P.bone_box(defective, P.DEFAULT_MARGIN_MM)
    return m


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _read_binary_stl(path: Path) -> np.ndarray:
    """Independent binary STL parser: (F, 3, 3) triangle vertices."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<I", raw, 80)
    assert len(raw) == 84 + 50 * n
    rec = np.frombuffer(raw[84:], dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]), count=n)
    return rec["v"].astype(np.float64)


def _world_bbox(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z, 1.0] for x in (-0.5, vol.shape[0] - 0.5) for y in (-0.5, vol.shape[1] - 0.5) for z in (-0.5, vol.shape[2] - 0.5)])
    w = (vol.affine @ corners.T).T[:, :3]
    return w.min(0), w.max(0)


def test_reconstruct_maps_back_to_the_input_grid() -> None:
    complete, defective = _skull_pair()
    model = _oracle(complete, defective)
    (rec,) = Q.reconstruct(model, [defective], batch_size=2)
    assert model.calls == [(1, 1, SIZE, SIZE, SIZE)]
    for out in (rec.complete, rec.implant):
        assert out.shape == defective.shape and out.data.dtype == np.uint8
        np.testing.assert_array_equal(out.affine, defective.affine)
        assert out.header["descrip"].tobytes().rstrip(b"\0") == b"input header"
    implant, comp, dfct = (rec.implant.data.astype(bool), rec.complete.data.astype(bool), defective.data.astype(bool))
    assert not (implant & ~(comp & ~dfct)).any()  # implant subset of complete minus defective
    true_implant = complete.data.astype(bool) & ~dfct
    assert _dice(implant, true_implant) > 0.75
    assert _dice(comp, complete.data) > 0.7
    # The 32^3 products the viewer uses.
    assert rec.prepared_input.shape == (SIZE,) * 3 and rec.prepared_prob.shape == (SIZE,) * 3
    np.testing.assert_array_equal(rec.prepared_prediction.data, rec.prepared_prob > 0.5)
    np.testing.assert_allclose(rec.prepared_prediction.affine, rec.prepared_input.affine)
    assert rec.info["implant_voxels"] == implant.sum() > 0


def test_reconstruct_batches_and_keeps_order() -> None:
    complete, defective = _skull_pair()
    model = _oracle(complete, defective)
    recs = Q.reconstruct(model, [defective] * 3, batch_size=2)
    assert model.calls == [(2, 1, SIZE, SIZE, SIZE), (1, 1, SIZE, SIZE, SIZE)]
    for r in recs[1:]:
        np.testing.assert_array_equal(r.implant.data, recs[0].implant.data)


def test_remove_small_islands_uses_mm3() -> None:
    mask = np.zeros((20, 20, 20), bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels
    mask[10:15, 10:15, 10:15] = True  # 125 voxels
    aff = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 per voxel: 64 mm^3 and 1000 mm^3
    kept, removed = Q.remove_small_islands(mask, aff, min_mm3=100.0)
    assert removed == 1 and kept.sum() == 125 and kept[12, 12, 12] and not kept[3, 3, 3]
    kept, removed = Q.remove_small_islands(mask, aff, min_mm3=50.0)
    assert removed == 0 and kept.sum() == 133


def test_remove_small_islands_in_its_box_equals_skimage_on_the_whole_volume() -> None:
    # The labelling runs inside the mask's bounding box only; skimage on the whole grid is the reference.
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(seed_of_this_test())
    mask = np.zeros((60, 50, 40), bool)
    mask[12:41, 9:30, 17:35] = rng.random((29, 21, 18)) < 0.3  # many pieces of all sizes, away from the border
    aff = np.diag([0.5, 0.5, 0.5, 1.0])  # 0.125 mm^3 per voxel: 1 mm^3 = 8 voxels
    kept, removed = Q.remove_small_islands(mask, aff, min_mm3=1.0)
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    ref = remove_small_objects(labels, max_size=7)  # drops pieces of at most 7 voxels
    np.testing.assert_array_equal(kept, ref > 0)
    assert 0 < removed == n - len(np.unique(ref[ref > 0])) and kept.any()


def test_mesh_from_mask_is_in_mm_and_outward() -> None:
    for aff in (_affine(), np.diag([0.5, 0.7, 1.3, 1.0])):
        g = np.meshgrid(*(np.arange(30) - 14.5,) * 3, indexing="ij")
        ball = (np.sqrt(sum(x**2 for x in g)) <= 9).astype(np.uint8)
        verts, faces = M.mesh_from_mask(ball, aff)
        tri = verts[faces]
        signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
        mask_mm3 = ball.sum() * Q.voxel_volume_mm3(aff)
        assert signed > 0 and abs(signed - mask_mm3) / mask_mm3 < 0.05  # closed, outward, right volume in mm^3
        centre = (aff @ [14.5, 14.5, 14.5, 1.0])[:3]
        np.testing.assert_allclose(verts.mean(0), centre, atol=0.2)
    v, f = M.mesh_from_mask(np.zeros((4, 4, 4)), np.eye(4))
    assert v.shape == (0, 3) and f.shape == (0, 3)


def _write_inputs(folder: Path, defective: Volume) -> None:
    write_nifti(folder / "a.nii.gz", defective.data, defective.affine, defective.header)
    # The same skull as NRRD (ITK LPS space): RAS affine -> LPS direction/origin.
    lps = np.diag([-1.0, -1.0, 1.0])
    m = lps @ defective.affine[:3, :3]
    sp = np.linalg.norm(m, axis=0)
    img = sitk.GetImageFromArray(defective.data.transpose(2, 1, 0).astype(np.int32))
    img.SetSpacing(sp.tolist())
    img.SetDirection((m / sp).ravel().tolist())
    img.SetOrigin((lps @ defective.affine[:3, 3]).tolist())
    sitk.WriteImage(img, str(folder / "b.nrrd"), useCompression=True)


def test_predict_command_writes_nifti_and_stl_on_the_input_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    complete, defective = _skull_pair()
    _write_inputs(tmp_path / "in", defective)
    model = _oracle(complete, defective)
    from skullrec import config
    from skullrec.nets import checkpoint

    cfg = config.config_from_dict({"model": {"size": SIZE}})
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, device="cpu": (model, cfg, {"epoch": 1}))
    out = tmp_path / "out"
    predict_command(checkpoint=tmp_path / "fake.safetensors", inp=tmp_path / "in", out=out, stl_skull=True, batch_size=2, device="cpu")
    report = json.loads((out / "predict.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == ["a", "b"]
    assert report["stl"] == {"parts": ["implant", "complete"], "frame": "LPS", "units": "mm", "smooth": False}
    lo, hi = _world_bbox(defective)
    implants = []
    for cid, ext in (("a", ".nii.gz"), ("b", ".nrrd")):  # each output in its input's format
        src = read_volume(tmp_path / "in" / f"{cid}{ext}")
        for kind in ("complete", "implant"):
            v = read_volume(out / kind / f"{cid}{ext}")
            assert v.shape == src.shape
            np.testing.assert_allclose(v.affine, src.affine, atol=1e-4)
            tri = _read_binary_stl(out / "stl" / f"{cid}_{kind}.stl")
            assert (out / "stl" / f"{cid}_{kind}.stl").read_bytes()[:80].rstrip() == f"skullrec {cid} {kind} SPACE=LPS mm".encode()
            assert len(tri) > 100
            pts = tri.reshape(-1, 3) * [-1.0, -1.0, 1.0]  # LPS -> RAS, the frame of _world_bbox
            assert np.all(pts >= lo - 1e-3) and np.all(pts <= hi + 1e-3)
            # The mesh encloses the mask's volume in mm^3 (STL in mm, not voxels).
            signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
            vol_mm3 = v.data.sum() * Q.voxel_volume_mm3(v.affine)
            assert abs(signed - vol_mm3) / vol_mm3 < 0.15, (cid, kind, signed, vol_mm3)
        implants.append(read_volume(out / "implant" / f"{cid}{ext}").data)
        assert not (implants[-1].astype(bool) & src.data.astype(bool)).any()
    np.testing.assert_array_equal(implants[0], implants[1])  # NIfTI and NRRD of the same skull agree
    hdr = nib.load(str(out / "complete" / "a.nii.gz")).header
    assert hdr["descrip"].tobytes().rstrip(b"\0") == b"input header"


def test_predict_command_reports_an_empty_implant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    complete, defective = _skull_pair()
    _write_inputs(tmp_path / "in", defective)
    (tmp_path / "in" / "b.nrrd").unlink()
    model = _oracle(complete, defective, empty=True)
    from skullrec import config
    from skullrec.nets import checkpoint

    cfg = config.config_from_dict({"model": {"size": SIZE}})
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, device="cpu": (model, cfg, {}))
    out = tmp_path / "out"
    predict_command(checkpoint=tmp_path / "c", inp=tmp_path / "in", out=out, stl=True, device="cpu")
    assert read_volume(out / "implant" / "a.nii.gz").data.sum() == 0
    assert json.loads((out / "predict.json").read_text())["cases"][0]["implant_empty"] is True
    assert not (out / "stl" / "a_implant.stl").exists()


def test_predict_cli_with_a_real_tiny_checkpoint(tmp_path: Path) -> None:
    from skullrec.config import config_from_dict
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    cfg = config_from_dict({"model": {"size": SIZE, "channels": [2, 2, 2, 2, 2]}})
    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_model(cfg.model, seed=0), cfg, epoch=0)
    _, defective = _skull_pair((37, 45, 29))
    _write_inputs(tmp_path / "in", defective)
    runner = CliRunner()
    args = ["predict", "--checkpoint", str(ckpt), "--in", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for cid, ext in (("a", ".nii.gz"), ("b", ".nrrd")):
        v = read_volume(tmp_path / "out" / "complete" / f"{cid}{ext}")
        assert v.shape == (37, 45, 29)
        np.testing.assert_allclose(v.affine, defective.affine, atol=1e-4)
    res = runner.invoke(app, args)  # output exists: refused without --overwrite
    assert res.exit_code == 2 and "--overwrite" in res.output
    bad = ["predict", "--checkpoint", str(tmp_path / "in" / "a.nii.gz"), "--in", str(tmp_path / "in"), "--out", str(tmp_path / "o2")]
    res = runner.invoke(app, bad)  # not a checkpoint
    assert res.exit_code == 2 and "a.nii.gz" in res.output and "Traceback" not in res.output
