"""The viewer: its pure helpers (skullrec.viewer.helpers) and the Streamlit page (skullrec/viewer/page.py, through app/viewer.py) via AppTest.

Everything runs on a tiny 32^3 data set and a small untrained checkpoint written in a temp folder,
so the tests need neither the synthetic data set nor a trained run.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO

from skullrec.cli import view_command
from skullrec.errors import InputError
from skullrec.io import Volume, read_volume
from skullrec.viewer import helpers as V
from skullrec.viewer import launch as L

APP = REPO / "app" / "viewer.py"  # the checkout entry; it runs the package's page
PAGE = REPO / "skullrec" / "viewer" / "page.py"
SPACING = (1.5, 1.5, 2.0)
TIMEOUT = 120  # seconds per AppTest run: model loading + reconstruction on a busy 2-core CI machine

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# fixtures: a tiny data set in the project's layout and a small checkpoint
# ------------------------------------------------------------------------------------------


def toy_skull(n: int = 32, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal shell (complete) and the same shell with a cap cut off the top (defective)."""
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for _ in range(3)), indexing="ij")
    r = np.sqrt((x / 12) ** 2 + ((y - shift) / 13) ** 2 + (z / 11) ** 2)
    complete = ((r > 0.78) & (r <= 1.0)).astype(np.uint8)
    defective = complete.copy()
    defective[(z > 5) & (np.abs(x) < 6)] = 0
    return complete, defective


def toy_affine() -> np.ndarray:
    # The canonical voxel order (axis 0 -> left, 1 -> posterior, 2 -> superior) that read_volume returns.
    a = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    a[:3, 3] = (-20.0, -30.0, 5.0)
    return a


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    from skullrec.data.layout import write_case, write_manifest

    root = tmp_path / "data"
    records = []
    for split, ids in (("train", ["000"]), ("eval_set1", ["003", "007"])):
        for k, cid in enumerate(ids):
            complete, defective = toy_skull(shift=k)
            counts = write_case(root, split, cid, complete, defective, toy_affine())
            records.append({"split": split, "id": cid, **counts})
    write_manifest(root, records, {"source": "test"})
    return root


def small_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained 32^3 autoencoder whose output bias makes the reconstruction non-empty."""
    from skullrec.config import config_from_dict
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    cfg = config_from_dict({"name": "tiny", "model": {"size": 32, "channels": [4, 8, 8, 4], "strides": [2, 2, 2, 2]}})
    model = build_model(cfg.model, seed=seed)
    return save_checkpoint(path, model, cfg, epoch=1)


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    small_checkpoint(root / "a" / "last.safetensors", seed=0)
    small_checkpoint(root / "b" / "last.safetensors", seed=1)
    return root


# ------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------


def test_settings_round_trip_through_environment(tmp_path: Path) -> None:
    s = L.ViewerSettings(data=tmp_path / "d", runs=(tmp_path / "r1", tmp_path / "r2"), results=tmp_path / "x.csv", max_upload_mb=7)
    assert L.settings_from_env(s.to_env()) == s
    default = L.settings_from_env({})
    assert default.data == Path("data/synthetic")
    assert default.runs == (Path("runs"), Path("results"))
    assert default.results is None and default.max_upload_mb == 256
    with pytest.raises(InputError, match="SKULLREC_VIEW_MAX_UPLOAD_MB"):
        L.settings_from_env({L.ENV_MAX_UPLOAD_MB: "lots"})


def test_view_command_runs_streamlit_headless_on_localhost(monkeypatch, dataset: Path, runs: Path) -> None:
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env):
            seen["cmd"], seen["env"] = cmd, env

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(L.subprocess, "Popen", FakePopen)
    view_command(data=dataset, runs=runs, results=None, host="127.0.0.1", port=8765)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == PAGE
    opts = dict(zip(cmd[5::2], cmd[6::2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8765"
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
    assert opts["--server.maxUploadSize"] == "256"
    assert seen["env"][L.ENV_DATA] == str(dataset.resolve()) and seen["env"][L.ENV_RUNS] == str(runs.resolve())

    with pytest.raises(InputError, match="--port"):
        view_command(data=None, runs=None, results=None, host="127.0.0.1", port=0)
    with pytest.raises(InputError, match="nowhere.*--data"):
        view_command(data=dataset / "nowhere", runs=None, results=None, host="127.0.0.1", port=8501)
    with pytest.raises(InputError, match="no such results CSV"):
        view_command(data=None, runs=None, results=dataset / "x.csv", host="127.0.0.1", port=8501)


def test_view_cli_reports_bad_folder_in_one_line(dataset: Path) -> None:
    from typer.testing import CliRunner

    from skullrec.cli import app

    res = CliRunner().invoke(app, ["view", "--data", str(dataset / "missing")])
    assert res.exit_code == 2
    assert "missing: no such folder" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------
# cases, checkpoints, results
# ------------------------------------------------------------------------------------------


def test_cases_are_found_and_loaded_with_truth(dataset: Path) -> None:
    assert V.discover_cases(dataset) == {"train": ["000"], "eval_set1": ["003", "007"]}
    assert V.discover_cases(dataset / "absent") == {}
    case = V.load_case(dataset, "eval_set1", "007")
    complete, defective = toy_skull(shift=1)
    np.testing.assert_array_equal(case.defective.data, defective)
    np.testing.assert_array_equal(case.complete.data, complete)
    np.testing.assert_array_equal(case.implant.data, complete & (1 - defective))
    assert case.defective.spacing == pytest.approx(SPACING)
    # CSV readers turn "007" into 7: both forms find the case.
    assert V.find_case(dataset, "7") == ("eval_set1", "007")
    assert V.find_case(dataset, "000", "train") == ("train", "000")
    assert V.find_case(dataset, "003", "train") is None
    with pytest.raises(InputError, match="no case '042'"):
        V.load_case(dataset, "eval_set1", "042")


def test_checkpoints_found_under_several_roots(tmp_path: Path) -> None:
    for rel in ("runs/a/last.safetensors", "runs/a/state.pt", "runs/.staging/x.safetensors",
                "results/demo/runs/fam_seed0/ckpt_epoch006.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = V.discover_checkpoints((tmp_path / "runs", tmp_path / "results", tmp_path / "absent"))
    assert list(found) == ["results/demo/runs/fam_seed0/ckpt_epoch006.safetensors", "runs/a/last.safetensors"]
    assert found["runs/a/last.safetensors"] == tmp_path / "runs/a/last.safetensors"


def test_per_case_csvs_and_default_comparison_are_found(tmp_path: Path) -> None:
    demo = tmp_path / "results" / "demo"
    demo.mkdir(parents=True)
    (demo / "per_case.csv").write_text("method,seed,epoch,set,case,dsc\nfam,0,6,eval_set1,001,0.9\n")
    (demo / "table2.csv").write_text("method,set,epoch,dsc\nfam,eval_set1,6,0.9\n")  # summary: no case column
    (demo / "eval.csv").write_text('"Case_ID",dsc\n001,0.9\n')
    assert V.discover_results(tmp_path / "results") == [demo / "eval.csv", demo / "per_case.csv"]
    assert V.discover_results(tmp_path / "absent") == []
    labels = ["r/baseline/best.safetensors", "r/baseline/last.safetensors", "r/fam/ckpt_epoch003.safetensors", "r/fam/last.safetensors"]
    assert V.default_pair(labels) == (1, 3)
    assert V.default_pair(labels[:3]) == (0, 1)


def test_results_csv_sorted_by_any_metric(tmp_path: Path) -> None:
    csv = tmp_path / "per_case.csv"
    csv.write_text("method,seed,set,case,dsc,hd_mm,hd95_mm,failed,failure\n"
                   "fam,0,eval_set1,003,0.91,4.5,2.0,False,\n"
                   "fam,0,eval_set1,007,0.72,9.0,6.5,False,\n"
                   "fam,0,eval_set2,001,,12.0,8.0,True,\n")
    df = V.load_results(csv)
    assert df["case"].tolist() == ["003", "007", "001"]  # zeros kept
    # Not metrics: seed (bookkeeping), failed (bool), failure (empty text read as NaN).
    assert V.metric_columns(df) == ["dsc", "hd_mm", "hd95_mm"]
    by_dsc = V.sort_results(df, "dsc", ascending=True)
    assert by_dsc["case"].tolist() == ["007", "003", "001"]  # NaN last
    by_hd = V.sort_results(df, "hd95_mm", ascending=False)
    assert by_hd["hd95_mm"].tolist() == sorted(df["hd95_mm"], reverse=True)

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="bad.csv: no case-id column"):
        V.load_results(bad)
    bad.write_text("")
    with pytest.raises(InputError, match="bad.csv: not a readable CSV"):
        V.load_results(bad)
    with pytest.raises(InputError, match="no such file"):
        V.load_results(tmp_path / "absent.csv")


# ------------------------------------------------------------------------------------------
# uploads
# ------------------------------------------------------------------------------------------


def nifti_payload(data: np.ndarray, affine: np.ndarray | None = None, name: str = "x.nii.gz") -> bytes:
    """NIfTI file bytes (gzipped when ``name`` ends in .gz), as a browser would upload them."""
    img = nib.Nifti1Image(np.asarray(data), toy_affine() if affine is None else affine)
    if name.endswith(".gz"):
        return gzip.compress(img.to_bytes(), mtime=0)
    return img.to_bytes()


def test_upload_reads_nifti_and_nrrd_like_read_volume(tmp_path: Path) -> None:
    complete, defective = toy_skull()
    vol = V.read_upload("case.nii.gz", nifti_payload(defective))
    np.testing.assert_array_equal(vol.data, defective)
    np.testing.assert_allclose(vol.affine, toy_affine())
    # NRRD through SimpleITK: the same file read from disk gives the same volume.
    img = sitk.GetImageFromArray(defective.transpose(2, 1, 0).copy())
    img.SetSpacing(SPACING)
    path = tmp_path / "case.nrrd"
    sitk.WriteImage(img, str(path))
    up = V.read_upload("my case.nrrd", path.read_bytes())
    ref = read_volume(path)
    np.testing.assert_array_equal(up.data, ref.data)
    np.testing.assert_allclose(up.affine, ref.affine)


@pytest.mark.parametrize(
    "name, payload, match",
    [
        ("skull.png", b"\x89PNG....", r"^skull.png: unsupported file type"),
        ("skull.nii.gz", b"", r"^skull.nii.gz: empty file \(0 bytes\)$"),
        ("skull.nii.gz", "gzip-truncated", r"^skull.nii.gz: corrupt or truncated gzip"),
        ("skull.nii", "4d", r"^skull.nii: expected a 3D volume, got shape \(32, 32, 32, 2\)$"),
        ("skull.nii", "nonbinary", r"^skull.nii: mask has values other than 0 and 1 .*tick 'Binarise' and set a threshold$"),
        ("skull.nrrd", b"P3\n1 1\n", r"^skull.nrrd: not a NRRD file"),
        ("big.nii", "big", r"^big.nii: 1.0 MB is over the upload limit of 0.5 MB$"),
    ],
)
def test_bad_uploads_raise_one_line_input_errors(name: str, payload, match: str) -> None:
    _, defective = toy_skull()
    if payload == "gzip-truncated":
        payload = nifti_payload(defective)[:-200]
    elif payload == "4d":
        payload = nifti_payload(np.stack([defective, defective], axis=-1), name=name)
    elif payload == "nonbinary":
        payload = nifti_payload(defective.astype(np.float32) * 0.7, name=name)
    elif payload == "big":
        payload = b"\0" * 2**20
    with pytest.raises(InputError, match=match) as exc:
        V.read_upload(name, payload, max_mb=0.5)
    assert "\n" not in str(exc.value) and "skullrec-upload-" not in str(exc.value)


def test_threshold_binarises_a_probability_map() -> None:
    _, defective = toy_skull()
    prob = defective.astype(np.float32) * 0.7 + 0.1
    vol = V.read_upload("p.nii", nifti_payload(prob, name="p.nii"), threshold=0.5)
    np.testing.assert_array_equal(vol.data, defective)


# ------------------------------------------------------------------------------------------
# 3D view, slices, downloads
# ------------------------------------------------------------------------------------------


def test_downsampling_keeps_blocks_in_place_in_mm() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((40, 30, 20)) > 0.97).astype(np.uint8)
    affine = toy_affine()
    small, a2 = V.downsample_for_mesh(mask, affine, max_edge=10)
    f = 4  # ceil(40 / 10)
    assert small.shape == (10, 8, 5)
    # A block is bone when any of its voxels is (block-max keeps thin bone).
    i, j, k = 3, 5, 2
    assert small[i, j, k] == mask[i * f:(i + 1) * f, j * f:(j + 1) * f, k * f:(k + 1) * f].max()
    # Its world position is the mean world position of its f^3 voxels, computed independently.
    idx = np.stack(np.meshgrid(*(np.arange(b * f, (b + 1) * f) for b in (i, j, k)), indexing="ij"), -1).reshape(-1, 3)
    centre = (affine[:3, :3] @ idx.T).T.mean(0) + affine[:3, 3]
    np.testing.assert_allclose(a2[:3, :3] @ [i, j, k] + a2[:3, 3], centre)
    same, a3 = V.downsample_for_mesh(mask, affine, max_edge=40)
    assert same is mask and a3 is affine


def test_surface_trace_and_figure_are_in_mm() -> None:
    complete, _ = toy_skull()
    verts, faces = V.surface(complete, toy_affine())
    assert verts.dtype == np.float32 and faces.dtype == np.int32 and len(faces) > 1000
    # The surface lies within the bone's world bounding box in LPS mm (the STL's frame), padded by one voxel.
    idx = np.argwhere(complete)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ toy_affine()
    ends = [lps[:3, :3] @ i + lps[:3, 3] for i in (idx.min(0), idx.max(0))]
    lo = np.minimum(*ends) - np.array(SPACING)
    hi = np.maximum(*ends) + np.array(SPACING)
    assert np.all(verts >= lo - 1e-3) and np.all(verts <= hi + 1e-3)
    trace = V.mesh_trace(verts, faces, "implant", opacity=0.4)
    assert trace.type == "mesh3d" and trace.color == "rgb(240,80,30)" and trace.opacity == 0.4
    assert V.mesh_trace(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int32), "implant") is None
    fig = V.figure_3d([trace, None])
    assert len(fig.data) == 1 and fig.layout.scene.aspectmode == "data"
    assert fig.layout.scene.xaxis.title.text == "x (mm, to the left)"


def test_default_case_is_held_out() -> None:
    assert V.default_split(["train", "eval_set1", "eval_set2"]) == 1
    assert V.default_split(["train", "val", "test"]) == 2  # eval_* first, then test*, then val*
    assert V.default_split(["train", "validation"]) == 1
    assert V.default_split(["train"]) == 0 and V.default_split([]) == 0


def test_camera_looks_at_an_implant_on_top_from_above() -> None:
    complete, defective = toy_skull()
    implant = complete & (1 - defective)  # the cap cut off the top
    skull_v, _ = V.surface(defective, toy_affine())
    imp_v, _ = V.surface(implant, toy_affine())
    ranges = V.scene_ranges([skull_v, imp_v])
    cam = V.implant_camera(imp_v, skull_v, ranges)
    centre = np.array([cam["center"][a] for a in "xyz"])
    eye = np.array([cam["eye"][a] for a in "xyz"])
    # Independently: plotly's scene coordinates of a point are (p - box middle) / longest box side here.
    lo, hi = np.array(ranges).T
    np.testing.assert_allclose(centre, (imp_v.mean(0) - (lo + hi) / 2) / (hi - lo).max(), atol=1e-6)
    view = (eye - centre) / np.linalg.norm(eye - centre)
    assert view[2] > 0.9  # the implant is on top: looked at from above, not from the front
    assert abs(cam["up"]["z"]) < 1e-9  # 'up' is not the line of sight
    fig = V.figure_3d([V.mesh_trace(skull_v, _, "defective")], ranges=ranges, camera=cam)
    sc = fig.layout.scene
    assert sc.aspectmode == "manual" and list(sc.xaxis.range) == [lo[0], hi[0]]
    # Equal mm per unit on every axis: aspect ratio proportional to each axis' length.
    ratios = np.array([sc.aspectratio.x, sc.aspectratio.y, sc.aspectratio.z])
    np.testing.assert_allclose(ratios, (hi - lo) / (hi - lo).max())
    assert sc.camera.eye.z == pytest.approx(eye[2])
    assert V.implant_camera(np.zeros((0, 3)), skull_v, ranges) is None


def test_slice_axes_are_the_3d_views_mm() -> None:
    complete, _ = toy_skull()
    verts, _ = V.surface(complete, toy_affine())
    for axis in range(3):
        spacing, origin, titles = V.slice_axes(toy_affine(), axis)
        rest = [a for a in range(3) if a != axis]
        assert titles == tuple(V.AXIS_TITLES[a] for a in rest)
        np.testing.assert_allclose(spacing, [SPACING[a] for a in rest])
        # The bone's extent along each in-plane axis, in the slice's mm, is the 3D surface's (within a voxel).
        idx = np.argwhere(complete)
        for k, a in enumerate(rest):
            mm = origin[k] + spacing[k] * idx[:, a]
            assert abs(mm.min() - verts[:, a].min()) <= SPACING[a] and abs(mm.max() - verts[:, a].max()) <= SPACING[a]
        fig = V.slice_figure(np.zeros((5, 4, 3), np.uint8), spacing, origin=origin, axis_titles=titles)
        assert fig.data[0].x0 == origin[0] and fig.data[0].y0 == pytest.approx(origin[1] + 4 * spacing[1])


def test_undefined_metrics_show_a_dash() -> None:
    complete, defective = toy_skull()
    truth, d = Volume(complete, toy_affine()), Volume(defective, toy_affine())
    empty = Volume(np.zeros_like(complete), toy_affine())
    rows = V.case_metric_rows(empty, truth, d, "skull")  # an empty prediction: distances undefined
    by = {(r["metric"], r["unit"]): r["value"] for r in rows}
    assert by[("HD95", "mm")] is None and by[("HD", "mm")] is None and by[("DSC", "")] == 0.0
    assert by[("failed", "empty prediction")] == 1.0
    assert V.metric_text(by[("HD95", "mm")], "mm", ".2f") == "—"
    assert V.metric_text(float("nan"), "mm") == "—" and V.metric_text(0.0, "mm", ".2f") == "0.00 mm"
    table = V.metric_table(rows)
    assert [r["value"] for r in table if r["metric"] == "HD95"] == ["—", "—"] and table[0]["value"] == "0"
    good = {(r["metric"], r["unit"]): r["value"] for r in V.case_metric_rows(truth, truth, d, "skull")}
    assert good[("HD95", "mm")] == 0.0 and good[("DSC", "")] == 1.0  # a perfect prediction: 0 mm is a value


def test_slice_overlay_colours_and_orientation() -> None:
    d = np.zeros((4, 5, 6), np.uint8)
    imp = np.zeros_like(d)
    d[1, 0, 2] = 1  # axis 2 slice 2: u = 1, v = 0 -> bottom row, column 1
    imp[3, 4, 2] = 1  # u = 3, v = 4 -> top row, column 3
    imp[1, 0, 2] = 1  # drawn over bone with alpha 0.5
    img = V.slice_overlay({"defective": d, "implant": imp}, axis=2, index=2, alpha=0.5)
    assert img.shape == (5, 4, 3) and img.dtype == np.uint8
    bone, red = np.array(V.COLOURS["defective"]), np.array(V.COLOURS["implant"])
    np.testing.assert_array_equal(img[-1, 1], np.round(0.5 * bone + 0.5 * red))
    np.testing.assert_array_equal(img[0, 3], red)  # on the background: full colour
    assert img.sum() == np.round(0.5 * bone + 0.5 * red).sum() + red.sum()
    # Along axis 0 the plane is (y, z): voxel (1, 0, 2) is at column 0, row 5 - 1 - 2.
    img0 = V.slice_overlay({"defective": d}, axis=0, index=1)
    assert img0.shape == (6, 5, 3) and tuple(np.argwhere(img0.any(-1))[0]) == (3, 0)
    with pytest.raises(ValueError, match="out of range"):
        V.slice_overlay({"defective": d}, axis=2, index=6)


def read_binary_stl(payload: bytes) -> np.ndarray:
    """Triangles (F, 3, 3) of a binary STL, parsed with struct (independent of the writer)."""
    (n,) = struct.unpack_from("<I", payload, 80)
    assert len(payload) == 84 + 50 * n
    tris = [struct.unpack_from("<12fH", payload, 84 + 50 * t)[3:12] for t in range(n)]
    return np.array(tris, dtype=np.float64).reshape(n, 3, 3)


def test_stl_download_encloses_the_mask_volume() -> None:
    # A solid box of 6 x 8 x 4 voxels; its marching-cubes surface encloses close to that many voxels.
    mask = np.zeros((12, 14, 10), np.uint8)
    mask[3:9, 3:11, 3:7] = 1
    tris = read_binary_stl(V.stl_bytes(mask, toy_affine(), "box"))
    # Divergence theorem: enclosed volume = |sum of signed tetrahedron volumes| (mm^3).
    vol = abs(np.einsum("ij,ij->i", tris[:, 0], np.cross(tris[:, 1], tris[:, 2])).sum()) / 6
    voxel = np.prod(SPACING)
    # Marching cubes at level 0.5 cuts the corners of the box: between the inner box and the full one.
    assert 4 * 6 * 2 * voxel < vol <= 6 * 8 * 4 * voxel
    assert vol == pytest.approx(6 * 8 * 4 * voxel, rel=0.35)


def test_nifti_download_round_trips() -> None:
    complete, _ = toy_skull()
    payload = V.nifti_bytes(Volume(complete, toy_affine()))
    img = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    np.testing.assert_array_equal(np.asarray(img.dataobj), complete)
    np.testing.assert_allclose(img.affine, toy_affine())
    assert img.get_data_dtype() == np.uint8


# ------------------------------------------------------------------------------------------
# the Streamlit page (AppTest)
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def app(monkeypatch, tmp_path: Path, dataset: Path, runs: Path):
    """An AppTest of app/viewer.py on the tiny data set and runs, with fresh Streamlit caches."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from skullrec.inference.shipped import MODELS_ENV

    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "no-shipped-models"))  # a test adds its own shipped pair
    monkeypatch.setenv(L.ENV_DATA, str(dataset))
    monkeypatch.setenv(L.ENV_RUNS, str(runs))
    monkeypatch.delenv(L.ENV_RESULTS, raising=False)
    monkeypatch.setenv(L.ENV_MAX_UPLOAD_MB, "1")
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    yield at
    st.cache_data.clear()
    st.cache_resource.clear()


def chart_traces(at, key: str) -> list[dict]:
    """The plotly traces of the chart with widget key ``key`` (from the element's JSON spec)."""
    for el in at.get("plotly_chart"):
        if el.proto.id and key in el.proto.id:
            return json.loads(el.proto.spec)["data"]
    raise AssertionError(f"no plotly chart with key {key}")


def chart_layout(at, key: str) -> dict:
    """The plotly layout of the chart with widget key ``key``."""
    for el in at.get("plotly_chart"):
        if el.proto.id and key in el.proto.id:
            return json.loads(el.proto.spec)["layout"]
    raise AssertionError(f"no plotly chart with key {key}")


def array_of(value) -> np.ndarray:
    """A plotly JSON array: a plain list or a base64 typed array ``{"dtype": ..., "bdata": ...}``."""
    if isinstance(value, dict):
        import base64

        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
    return np.asarray(value)


def no_failures(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_page_lists_cases_and_checkpoints(app) -> None:
    at = app.run()
    no_failures(at)
    assert at.sidebar.radio(key="source").value == "Data set"
    assert at.sidebar.selectbox(key="split").options == ["train", "eval_set1"]
    # The page opens on a held-out case, not on one the model was trained on.
    assert at.sidebar.selectbox(key="split").value == "eval_set1" and at.sidebar.selectbox(key="case").value == "003"
    assert at.sidebar.selectbox(key="case").options == ["003", "007"]
    assert at.sidebar.selectbox(key="ckpt").options == ["runs/a/last.safetensors", "runs/b/last.safetensors"]
    assert not at.sidebar.button(key="reconstruct").disabled
    # Before reconstructing: the defective skull in 3D, the slice viewer, no metrics yet.
    names = [t["name"] for t in chart_traces(at, "view3d")]
    assert names == ["Defective skull"]
    assert [t["type"] for t in chart_traces(at, "slice_view")] == ["image"]
    assert not at.metric
    # Slice controls: axis radio + slider over that axis's length.
    at.radio(key="axis").set_value("z (axial)").run()
    assert at.slider(key="slice_2").max == 31
    no_failures(at)


def test_reconstruct_shows_meshes_metrics_and_downloads(app) -> None:
    at = app.run()
    at.sidebar.selectbox(key="split").set_value("eval_set1").run()
    at.sidebar.selectbox(key="case").set_value("007").run()
    assert at.sidebar.selectbox(key="ckpt").value == "runs/a/last.safetensors"
    at.sidebar.selectbox(key="ckpt").set_value("runs/b/last.safetensors").run()
    at.sidebar.button(key="reconstruct").click().run()
    no_failures(at)
    assert not at.error, [e.value for e in at.error]
    for layer in ("reconstruction", "truth"):
        at.checkbox(key=f"show_{layer}").check()
    at.slider(key="opacity").set_value(0.5)
    at.run()
    traces = chart_traces(at, "view3d")
    names = [t["name"] for t in traces]
    assert {"Defective skull", "Ground truth"} <= set(names)
    bone = next(t for t in traces if t["name"] == "Defective skull")
    assert bone["type"] == "mesh3d" and bone["opacity"] == 0.5
    # Coordinates are LPS mm: x spans the bone's extent on the 1.5 mm grid running from +20 mm leftwards (+x).
    x = array_of(bone["x"])
    assert 20.0 - 1.5 <= x.min() and x.max() <= 20.0 + 31 * 1.5 + 1.5
    # The camera targets the implant (its centroid, in plotly's scene units of the fixed mm ranges).
    implant = next(t for t in traces if t["name"] == "Implant (predicted)")
    iv = np.stack([array_of(implant[a]) for a in "xyz"], 1).astype(np.float64)
    scene = chart_layout(at, "view3d")["scene"]
    lo, hi = np.array([scene[f"{a}axis"]["range"] for a in "xyz"]).T
    centre = np.array([scene["camera"]["center"][a] for a in "xyz"])
    np.testing.assert_allclose(centre, (iv.mean(0) - (lo + hi) / 2) / (hi - lo).max(), atol=1e-4)
    labels = [m.label for m in at.metric]
    assert labels == ["DSC (skull)", "HD (skull)", "HD95 (skull)", "DSC (implant)"]
    assert at.metric[1].value.endswith(" mm") and at.metric[2].value.endswith(" mm")
    # The metric values are those of skullrec.evaluation.metrics on the reconstruction the page made.
    from skullrec.evaluation.metrics import case_metrics
    from skullrec.inference.predict import reconstruct
    from skullrec.nets.checkpoint import load_checkpoint

    case = V.load_case(L.settings_from_env().data, "eval_set1", "007")
    model, _, _ = load_checkpoint(L.settings_from_env().runs[0] / "b" / "last.safetensors")
    rec = reconstruct(model, [case.defective], batch_size=1, device="cpu")[0]
    ref = case_metrics(rec.complete.data, case.complete.data, case.complete.spacing, defective=case.defective.data)
    assert float(at.metric[0].value) == pytest.approx(ref["dsc"], abs=5e-4)
    assert float(at.metric[2].value.split()[0]) == pytest.approx(ref["hd95_mm"], abs=5e-3)
    labels = [d.proto.label for d in at.get("download_button")]
    assert labels == ["Implant (NII.GZ)", "Reconstruction (NII.GZ)", "Implant (STL)", "Reconstruction (STL)"]
    no_failures(at)


def test_shipped_stage1_and_stage2_are_the_default_and_give_predicts_implant(app, tmp_path: Path, monkeypatch) -> None:
    import torch

    from skullrec.config import stage2_config_from_dict
    from skullrec.inference.predict import apply_stage2, reconstruct
    from skullrec.inference.shipped import MODELS_ENV
    from skullrec.nets.checkpoint import load_checkpoint, load_implant_checkpoint, save_implant_checkpoint
    from skullrec.nets.implant_net import build_implant_net

    models = tmp_path / "models"
    small_checkpoint(models / "stage1.safetensors", seed=1)
    cfg2 = stage2_config_from_dict({"net": {"grid": 16, "box_mm": 40.0, "channels": [2, 4, 8], "strides": [2, 2]}})
    net = build_implant_net(cfg2.net, seed=0)
    with torch.no_grad():  # an untrained net that says "implant" everywhere: the restriction shapes it
        [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1].bias.fill_(50.0)
    save_implant_checkpoint(models / "stage2.safetensors", net, cfg2, epoch=1)
    monkeypatch.setenv(MODELS_ENV, str(models))
    at = app.run()
    assert at.sidebar.selectbox(key="ckpt").options[0] == V.SHIPPED_LABEL
    assert at.sidebar.selectbox(key="ckpt").value == V.SHIPPED_LABEL
    at.sidebar.selectbox(key="split").set_value("eval_set1").run()
    at.sidebar.selectbox(key="case").set_value("007").run()
    at.sidebar.button(key="reconstruct").click().run()
    no_failures(at)
    assert not at.error, [e.value for e in at.error]
    # The implant shown and scored is stage 2's, as skullrec predict makes it with the same two files.
    case = V.load_case(L.settings_from_env().data, "eval_set1", "007")
    m1, _, _ = load_checkpoint(models / "stage1.safetensors")
    m2, c2, _ = load_implant_checkpoint(models / "stage2.safetensors")
    stage1 = reconstruct(m1, [case.defective], batch_size=1, device="cpu")[0]
    rec = apply_stage2(stage1, case.defective, m2, c2, "cpu")
    assert rec.implant.data.any() and not (rec.implant.data.astype(bool) & case.defective.data.astype(bool)).any()
    assert not np.array_equal(rec.implant.data, stage1.implant.data)  # stage 2 changed it
    from skullrec.evaluation.metrics import case_metrics

    ref = case_metrics(rec.implant.data, case.implant.data, case.complete.spacing)
    assert float(at.metric[3].value) == pytest.approx(ref["dsc"], abs=5e-4)
    labels = [d.proto.label for d in at.get("download_button")]
    assert "Implant (STL)" in labels


def _huge_header() -> bytes:
    """A 1.4 KB gzipped NIfTI whose header claims 1500^3 voxels: bounded by the header, not the byte limit."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1500, 1500, 1500))
    hdr["vox_offset"] = 352
    return gzip.compress(hdr.binaryblock + b"\0" * 1004)


def upload_and_run(at, name: str, payload: bytes):
    at.sidebar.radio(key="source").set_value("Upload").run()
    at.sidebar.file_uploader(key="upload").upload(name, payload).run()
    return at


@pytest.mark.parametrize(
    "name, kind, message",
    [
        ("scan.png", "png", "scan.png: unsupported file type"),
        ("scan.nii.gz", "empty", "scan.nii.gz: empty file (0 bytes)"),
        ("scan.nii.gz", "truncated", "scan.nii.gz: corrupt or truncated gzip data"),
        ("scan.nii", "4d", "scan.nii: expected a 3D volume, got shape (32, 32, 32, 2)"),
        ("scan.nii", "nonbinary", "scan.nii: mask has values other than 0 and 1"),
        ("scan.nii", "big", "scan.nii: 2.0 MB is over the upload limit of 1 MB"),
        ("scan.nii.gz", "header", "scan.nii.gz: header claims 1500 x 1500 x 1500 voxels"),
    ],
)
def test_bad_upload_shows_error_and_page_keeps_working(app, name: str, kind: str, message: str) -> None:
    _, defective = toy_skull()
    payload = {
        "png": b"\x89PNG\r\n",
        "empty": b"",
        "truncated": nifti_payload(defective)[:-300],
        "4d": nifti_payload(np.stack([defective] * 2, axis=-1), name=name),
        "nonbinary": nifti_payload(defective.astype(np.float32) * 0.7 + 0.2, name=name),
        "big": b"\0" * (2 * 2**20),
        "header": _huge_header(),
    }[kind]
    at = upload_and_run(app.run(), name, payload)
    no_failures(at)
    assert len(at.error) == 1 and at.error[0].value.startswith(message), at.error[0].value
    assert "\n" not in at.error[0].value
    # The page still works: the other views render, and a good upload replaces the bad one.
    at.radio(key="page").set_value("Results").run()
    no_failures(at)
    at.radio(key="page").set_value("Case").run()
    if kind == "nonbinary":
        # The offered threshold turns the same file into a usable mask.
        at.sidebar.checkbox(key="use_threshold").check().run()
        at.sidebar.number_input(key="threshold").set_value(0.5).run()
    else:
        at.sidebar.file_uploader(key="upload").upload("good.nii.gz", nifti_payload(defective)).run()
    no_failures(at)
    assert not at.error, [e.value for e in at.error]
    assert [t["name"] for t in chart_traces(at, "view3d")] == ["Defective skull"]


def test_upload_with_truth_reconstructs_and_scores(app) -> None:
    complete, defective = toy_skull()
    at = upload_and_run(app.run(), "case.nii.gz", nifti_payload(defective))
    at.sidebar.file_uploader(key="upload_truth").upload("truth.nii.gz", nifti_payload(complete)).run()
    at.sidebar.button(key="reconstruct").click().run()
    no_failures(at)
    assert not at.error, [e.value for e in at.error]
    assert [m.label for m in at.metric][0] == "DSC (skull)"
    assert len(at.get("download_button")) == 4
    # A truth on another grid is refused with one line.
    at.sidebar.file_uploader(key="upload_truth").upload("small.nii.gz", nifti_payload(complete[:16])).run()
    assert at.error[0].value == "small.nii.gz: shape (16, 32, 32) differs from case.nii.gz (32, 32, 32)"


def test_results_browser_sorts_and_opens_a_case(app, tmp_path: Path, monkeypatch) -> None:
    csv = tmp_path / "per_case.csv"
    csv.write_text("method,set,case,dsc,hd_mm,hd95_mm\n"
                   "fam,eval_set1,003,0.91,4.5,2.0\n"
                   "fam,eval_set1,007,0.72,9.0,6.5\n"
                   "baseline,eval_set1,003,0.85,5.0,3.0\n")
    monkeypatch.setenv(L.ENV_RESULTS, str(csv))
    at = app.run()
    at.radio(key="page").set_value("Results").run()
    no_failures(at)
    assert at.selectbox(key="sort_metric").options == ["dsc", "hd_mm", "hd95_mm"]
    table = at.dataframe[0].value
    assert table["dsc"].tolist() == [0.72, 0.85, 0.91]  # worst first
    at.selectbox(key="sort_metric").set_value("hd95_mm").run()
    at.radio(key="sort_order").set_value("best first").run()
    assert at.dataframe[0].value["hd95_mm"].tolist() == [2.0, 3.0, 6.5]
    at.selectbox(key="filter_method").set_value("fam").run()
    assert at.dataframe[0].value["case"].tolist() == ["003", "007"]
    at.selectbox(key="result_pick").set_value(1).run()  # case 007
    at.button(key="open_case").click().run()
    no_failures(at)
    assert at.radio(key="page").value == "Case"
    assert at.sidebar.selectbox(key="split").value == "eval_set1"
    assert at.sidebar.selectbox(key="case").value == "007"


def test_compare_two_runs_side_by_side(app) -> None:
    at = app.run()
    at.radio(key="page").set_value("Compare runs").run()
    assert at.selectbox(key="run_a").value == "runs/a/last.safetensors"
    assert at.selectbox(key="run_b").value == "runs/b/last.safetensors"
    at.button(key="compare").click().run()
    no_failures(at)
    assert not at.error, [e.value for e in at.error]
    titles = [json.loads(el.proto.spec)["layout"]["title"]["text"] for el in at.get("plotly_chart")]
    assert titles == ["runs/a/last.safetensors", "runs/b/last.safetensors"]
    # Each side shows its own run's implant (the two untrained models differ).
    implants = [next(t for t in chart_traces(at, f"compare3d_{tag}") if t["name"] == "Implant (predicted)") for tag in "ab"]
    assert len(array_of(implants[0]["x"])) != len(array_of(implants[1]["x"]))
    assert len(at.dataframe) == 2  # one metrics table per run (the train case has a truth)
    dsc = [t.value.set_index(["target", "metric", "unit"]).loc[("skull", "DSC", ""), "value"] for t in at.dataframe]
    assert dsc[0] != dsc[1]


def test_page_without_data_or_runs_explains_what_to_do(monkeypatch, tmp_path: Path) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(L.ENV_DATA, str(tmp_path / "no-data"))
    monkeypatch.setenv(L.ENV_RUNS, str(tmp_path / "no-runs"))
    monkeypatch.setenv("SKULLREC_MODELS", str(tmp_path / "no-models"))  # an installation without the shipped weights
    monkeypatch.delenv(L.ENV_RESULTS, raising=False)
    monkeypatch.chdir(tmp_path)  # no results/ folder either
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    no_failures(at)
    assert at.sidebar.radio(key="source").value == "Upload"  # nothing to pick from
    assert "skullrec train" in at.sidebar.warning[0].value
    assert at.sidebar.button(key="reconstruct").disabled
    at.radio(key="page").set_value("Results").run()
    assert "No results CSV found" in at.info[0].value
    at.radio(key="page").set_value("Compare runs").run()
    no_failures(at)


def test_broken_checkpoint_is_an_error_line_not_a_crash(app, runs: Path) -> None:
    (runs / "c").mkdir()
    (runs / "c" / "last.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    at = app.run()
    at.sidebar.selectbox(key="ckpt").set_value("runs/c/last.safetensors").run()
    at.sidebar.button(key="reconstruct").click().run()
    no_failures(at)
    assert len(at.error) == 1 and "runs/c/last.safetensors: " in at.error[0].value and "\n" not in at.error[0].value
    # Another checkpoint still works on the same page.
    at.sidebar.selectbox(key="ckpt").set_value("runs/a/last.safetensors").run()
    at.sidebar.button(key="reconstruct").click().run()
    assert not at.error and [m.label for m in at.metric][0] == "DSC (skull)"


def test_nan_checkpoint_and_implausible_upload_are_errors_not_results(app, runs: Path) -> None:
    import torch

    from skullrec.nets.checkpoint import load_checkpoint, save_checkpoint

    model, cfg, _ = load_checkpoint(runs / "a" / "last.safetensors")
    with torch.no_grad():
        model.decodeL.weight[0, 0] = float("nan")
    (runs / "nan").mkdir()
    save_checkpoint(runs / "nan" / "last.safetensors", model, cfg)
    at = app.run()
    at.sidebar.selectbox(key="ckpt").set_value("runs/nan/last.safetensors").run()
    at.sidebar.button(key="reconstruct").click().run()
    no_failures(at)
    assert len(at.error) == 1 and "checkpoint weights are not finite" in at.error[0].value
    assert not at.get("download_button")
    # One bone voxel uploaded: no reconstruction is shown or offered for download.
    speck = np.zeros((32, 32, 32), np.uint8)
    speck[16, 16, 16] = 1
    at = upload_and_run(at, "speck.nii.gz", nifti_payload(speck))
    at.sidebar.selectbox(key="ckpt").set_value("runs/a/last.safetensors").run()
    at.sidebar.button(key="reconstruct").click().run()
    no_failures(at)
    assert len(at.error) == 1 and "no usable reconstruction: input is far from a plausible skull" in at.error[0].value
    assert not at.get("download_button") and not at.metric
