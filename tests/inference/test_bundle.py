"""skullrec export-bundle: a MONAI bundle whose `python -m monai.bundle run` gives skullrec predict's outputs.

Tiny weights (a 32^3 stage 1, a 16^3-grid stage 2) keep every test to seconds; the one subprocess
run of MONAI's command line needs ``fire`` (MONAI's optional CLI dependency) and skips without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.io import write_nifti

# The keys the MONAI Bundle specification (docs/source/mb_specification.rst) makes mandatory in
# metadata.json and in each tensor format specifier; the schema file verify_metadata downloads
# (metadata["schema"]) is not reachable offline, so this is checked against the specification's list.
MANDATORY_META = ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
                  "copyright", "network_data_format")
MANDATORY_TENSOR = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def")


def _stage1(path: Path) -> Path:
    from skullrec.config import config_from_dict
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    cfg = config_from_dict({"name": "tiny", "model": {"size": 32, "channels": [2, 2, 2, 2, 2]}})
    return save_checkpoint(path, build_model(cfg.model, seed=0), cfg, epoch=3)


def _stage2(path: Path) -> Path:
    from skullrec.config import stage2_config_from_dict
    from skullrec.nets.checkpoint import save_implant_checkpoint
    from skullrec.nets.implant_net import build_implant_net

    cfg2 = stage2_config_from_dict({"net": {"grid": 16, "box_mm": 60.0, "channels": [2, 4, 8], "strides": [2, 2]}})
    return save_implant_checkpoint(path, build_implant_net(cfg2.net, seed=0), cfg2, epoch=2)


def _defective_skull(path: Path) -> Path:
    """An ellipsoidal shell (~150 mm, 2.5 mm voxels) with a cap cut out: the defect."""
    shape = (60, 64, 52)
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 28) ** 2 + (g[1] / 30) ** 2 + (g[2] / 24) ** 2)
    shell = ((r <= 1) & (r >= 0.88)).astype(np.uint8)
    shell[18:42, 16:44, 34:] = 0
    aff = np.diag([-2.5, -2.5, 2.5, 1.0])
    aff[:3, 3] = (70.0, 80.0, -60.0)
    return write_nifti(path, shell, aff)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights, one defective skull, and a bundle exported from the weights (made once)."""
    w = tmp_path_factory.mktemp("bundle")
    _stage1(w / "weights" / "s1.safetensors")
    _stage2(w / "weights" / "s2.safetensors")
    _defective_skull(w / "in" / "case7.nii.gz")
    res = CliRunner().invoke(app, ["export-bundle", "--out", str(w / "bundle"), "--checkpoint", str(w / "weights" / "s1.safetensors"),
                                   "--stage2", str(w / "weights" / "s2.safetensors")])
    assert res.exit_code == 0, res.output
    return w


def _predict(w: Path, out: Path, stage2: bool = True) -> Path:
    args = ["predict", "--checkpoint", str(w / "weights" / "s1.safetensors"), "--in", str(w / "in"), "--out", str(out), "--device", "cpu"]
    if stage2:
        args += ["--stage2", str(w / "weights" / "s2.safetensors")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out


def _assert_same_outputs(got: Path, want: Path) -> int:
    """The NIfTI files of two prediction folders are voxel-identical with equal affines; the implant's voxel count."""
    names = sorted(str(p.relative_to(want)) for p in want.rglob("*.nii.gz"))
    assert names == ["complete/case7.nii.gz", "implant/case7.nii.gz"]
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*.nii.gz")) == names
    for name in names:
        a, b = nib.load(got / name), nib.load(want / name)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj), err_msg=name)
        np.testing.assert_array_equal(a.affine, b.affine)
    implant = np.asarray(nib.load(want / "implant" / "case7.nii.gz").dataobj)
    return int(implant.sum())


def test_export_writes_a_bundle_with_the_specifications_metadata(world: Path) -> None:
    import monai
    import safetensors

    b = world / "bundle"
    files = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files == ["LICENSE", "configs/inference.json", "configs/logging.conf", "configs/metadata.json", "docs/README.md",
                     "models/stage1.safetensors", "models/stage2.safetensors"]
    assert not list(b.parent.glob(".bundle.*"))  # no staging folder or lock left beside it
    # The weights are the given files, byte for byte.
    for name, src in (("stage1", "s1"), ("stage2", "s2")):
        assert (b / "models" / f"{name}.safetensors").read_bytes() == (world / "weights" / f"{src}.safetensors").read_bytes()
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    missing = [k for k in MANDATORY_META if k not in meta]
    assert not missing, missing
    assert meta["monai_version"] == monai.__version__ and meta["numpy_version"] == np.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["required_packages_version"]["safetensors"] == safetensors.__version__
    assert "optional_packages_version" not in meta  # MONAI 1.6 would rename it over required_packages_version
    for side in ("inputs", "outputs"):
        for spec in meta["network_data_format"][side].values():
            assert [k for k in MANDATORY_TENSOR if k not in spec] == []
            assert spec["spatial_shape"] == [32, 32, 32]  # the tiny stage 1's size, not a hard-coded 64
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2  # softmax head: background, bone
    import hashlib

    s2 = meta["skullrec"]["weights"]["stage2"]
    assert s2["sha256"] == hashlib.sha256((b / "models" / "stage2.safetensors").read_bytes()).hexdigest()
    assert (s2["box_mm"], s2["grid"]) == (60.0, 16)
    assert meta["skullrec"]["weights"]["stage1"]["training"]["meta"] == {"epoch": 3}
    # Custom weights: no licence claimed for them; the code's licence stated.
    assert "not stated" in (b / "LICENSE").read_text() and "Apache-2.0" in meta["license"]
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    assert cfg["predictor"]["_target_"] == "skullrec.inference.bundle.BundlePredictor"
    assert cfg["run"] == ["$@predictor(@dataset_dir, @output_dir)"]
    assert "monai.bundle run" in (b / "docs" / "README.md").read_text()


def test_metadata_passes_monai_verify_metadata_against_the_specifications_keys(world: Path, tmp_path: Path) -> None:
    """verify_metadata with a local schema (the download is skipped when the file exists): MONAI's own check runs offline."""
    from monai.bundle import verify_metadata

    tensor = {"type": "object", "required": list(MANDATORY_TENSOR)}
    schema = {"type": "object", "required": [*MANDATORY_META, "schema"], "properties": {
        "network_data_format": {"type": "object", "required": ["inputs", "outputs"], "properties": {
            "inputs": {"type": "object", "additionalProperties": tensor, "minProperties": 1},
            "outputs": {"type": "object", "additionalProperties": tensor, "minProperties": 1}}},
        "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    verify_metadata(meta_file=str(world / "bundle" / "configs" / "metadata.json"), filepath=str(tmp_path / "schema.json"))
    meta = json.loads((world / "bundle" / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["dtype"]
    (tmp_path / "broken.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dtype"):  # the check can fail
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(tmp_path / "schema.json"))


def test_bundle_weights_load_with_safetensors_and_never_unpickle(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from safetensors.torch import load_file

    from skullrec.nets.checkpoint import load_checkpoint, load_implant_checkpoint

    b = world / "bundle" / "models"
    for name in ("stage1", "stage2"):
        raw = (b / f"{name}.safetensors").read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])  # safetensors: length + JSON header, not a pickle/zip
    # Any unpickling from here on fails the test: plain safetensors and skullrec's loaders need none.
    def no_pickle(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    t1 = load_file(b / "stage1.safetensors")
    model1, cfg1, _ = load_checkpoint(b / "stage1.safetensors")
    assert cfg1.model.size == 32 and set(t1) == set(model1.state_dict())
    for k, v in model1.state_dict().items():
        assert torch.equal(t1[k], v), k
    t2 = load_file(b / "stage2.safetensors")
    model2, cfg2, _ = load_implant_checkpoint(b / "stage2.safetensors")
    assert cfg2.net.grid == 16 and all(torch.equal(t2[k], v) for k, v in model2.state_dict().items())


def test_bundle_workflow_in_process_equals_skullrec_predict(world: Path, tmp_path: Path) -> None:
    """MONAI's ConfigWorkflow (what `monai.bundle run` builds) on the bundle, run from another folder via bundle_root."""
    from monai.bundle import ConfigWorkflow

    b = world / "bundle"
    wf = ConfigWorkflow(config_file=str(b / "configs" / "inference.json"), meta_file=str(b / "configs" / "metadata.json"),
                        logging_file=False, workflow_type=None, bundle_root=str(b), dataset_dir=str(world / "in"),
                        output_dir=str(tmp_path / "bundle_out"), device="cpu")
    wf.initialize()
    [rows] = wf.run()
    assert [r["case_id"] for r in rows] == ["case7"] and "stage2" in rows[0]
    n = _assert_same_outputs(tmp_path / "bundle_out", _predict(world, tmp_path / "predict_out"))
    assert n > 0 and rows[0]["implant_voxels"] == n  # a real implant was compared, not two empty masks
    # Switches arrive from MONAI's command line as strings: '--overwrite true' replaces, 'false' refuses.
    wf.parser["overwrite"] = "true"
    wf.initialize()
    wf.run()
    from skullrec.errors import InputError

    wf.parser["overwrite"] = "false"
    wf.initialize()
    with pytest.raises(RuntimeError) as failed:  # MONAI wraps what the expression raised
        wf.run()
    assert isinstance(failed.value.__cause__, InputError) and "output folder is not empty" in str(failed.value.__cause__)


def test_monai_bundle_run_command_line_equals_skullrec_predict(world: Path, tmp_path: Path) -> None:
    """`python -m monai.bundle run` in a fresh process, from the bundle folder, as docs/how-to/bundle.md says."""
    pytest.importorskip("fire", reason="MONAI's bundle command line needs the 'fire' package")
    b = world / "bundle"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
           "--dataset_dir", str(world / "in"), "--output_dir", str(tmp_path / "bundle_out"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=b, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skullrec.bundle: 1 cases ->" in proc.stdout  # configs/logging.conf shows the predictor's log
    n = _assert_same_outputs(tmp_path / "bundle_out", _predict(world, tmp_path / "predict_out"))
    assert n > 0
    report = json.loads((tmp_path / "bundle_out" / "predict.json").read_text())
    assert report["stage2"] == "models/stage2.safetensors" and report["device"] == "cpu"


def test_stage1_only_bundle_and_default_shipped_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.bundle import ConfigWorkflow

    from skullrec.inference.shipped import MODELS_ENV

    # --checkpoint alone: stage 1's own implant, as predict without --stage2.
    w = tmp_path / "w"
    _stage1(w / "weights" / "s1.safetensors")
    _defective_skull(w / "in" / "case7.nii.gz")
    res = CliRunner().invoke(app, ["export-bundle", "--out", str(tmp_path / "b1"), "--checkpoint", str(w / "weights" / "s1.safetensors")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "b1" / "models" / "stage2.safetensors").exists()
    assert json.loads((tmp_path / "b1" / "configs" / "inference.json").read_text())["stage2_weights"] is None
    wf = ConfigWorkflow(config_file=str(tmp_path / "b1" / "configs" / "inference.json"), logging_file=False, workflow_type=None,
                        bundle_root=str(tmp_path / "b1"), dataset_dir=str(w / "in"), output_dir=str(tmp_path / "o1"), device="cpu")
    wf.initialize()
    wf.run()
    _assert_same_outputs(tmp_path / "o1", _predict(w, tmp_path / "p1", stage2=False))
    # No --checkpoint: the shipped weights (SKULLREC_MODELS) with their licence file.
    models = tmp_path / "models"
    _stage1(models / "stage1.safetensors")
    _stage2(models / "stage2.safetensors")
    (models / "LICENSE.md").write_text("CC BY-NC-SA 4.0 test licence text\n")
    monkeypatch.setenv(MODELS_ENV, str(models))
    res = CliRunner().invoke(app, ["export-bundle", "--out", str(tmp_path / "b2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b2" / "LICENSE").read_text() == "CC BY-NC-SA 4.0 test licence text\n"
    meta = json.loads((tmp_path / "b2" / "configs" / "metadata.json").read_text())
    assert meta["license"].startswith("weights: CC BY-NC-SA 4.0") and "SkullFix" in meta["data_source"]
    assert (tmp_path / "b2" / "models" / "stage2.safetensors").read_bytes() == (models / "stage2.safetensors").read_bytes()


def test_export_refuses_a_non_empty_out_without_overwrite_and_replaces_with_it(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("earlier results")
    args = ["export-bundle", "--out", str(out), "--checkpoint", str(world / "weights" / "s1.safetensors")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and res.stderr == f"error: {out}: output folder is not empty; pass --overwrite to replace its contents\n"
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    res = CliRunner().invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "models" / "stage1.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging folder, old copy or lock left


@pytest.mark.parametrize("args, message", [
    (["--stage2", "{w}/weights/s2.safetensors"], "--stage2: needs --checkpoint"),
    (["--checkpoint", "{w}/weights/s2.safetensors"], "not a skullrec checkpoint"),
    (["--checkpoint", "{w}/weights/s1.safetensors", "--stage2", "{w}/weights/s1.safetensors"], "not a stage-2 (implant) checkpoint"),
    (["--checkpoint", "{w}/weights/s1.safetensors", "--license", "{w}/nope.txt"], "nope.txt: no such licence file"),
])
def test_export_bad_weights_are_one_line_and_write_nothing(world: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["export-bundle", "--out", str(tmp_path / "b"), *[a.format(w=world) for a in args]])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"overwrite": "maybe"}, "overwrite: expected true or false, got 'maybe'"),
    ({"batch_size": "eight"}, "batch_size: expected a number, got 'eight'"),
    ({"stage2": None, "mirror": "true"}, "mirror: mirrors stage 2's box, and this bundle has no stage 2"),
    ({"stage2": "elsewhere/stage2.safetensors"}, "elsewhere/stage2.safetensors: no such weights file (run from the bundle folder"),
])
def test_bundle_variables_are_checked_with_one_line_messages(world: Path, kwargs: dict, message: str) -> None:
    from skullrec.errors import InputError
    from skullrec.inference.bundle import BundlePredictor

    models = world / "bundle" / "models"
    with pytest.raises(InputError) as err:
        BundlePredictor(**{"stage1": models / "stage1.safetensors", "stage2": models / "stage2.safetensors", **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)
