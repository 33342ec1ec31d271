"""Trustworthy on real inputs (issue 12): no input or result lost, garbage never written as a result,
bounded work from a header, no traceback for user-facing failures."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from skullrec.data.layout import check_output_dir, staged_output
from skullrec.errors import InputError

# ------------------------------------------------------------------------------------------
# no input or result lost
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_folder_overlapping_an_input_is_refused_whatever_the_flags(tmp_path: Path, overwrite: bool) -> None:
    data = tmp_path / "D"
    (data / "complete").mkdir(parents=True)
    (data / "complete" / "a.nii.gz").write_bytes(b"skull")
    for out, how in ((data / "complete", "is the input folder"), (data, "contains the input folder"),
                     (data / "complete" / "sub", "lies inside the input folder")):
        with pytest.raises(InputError, match=how):
            check_output_dir(out, overwrite, inputs=[data / "complete"])
        with pytest.raises(InputError, match=how):
            with staged_output(out, overwrite, inputs=[data / "complete"]):
                pass
    # A symlink to the input is the input.
    (tmp_path / "link").symlink_to(data / "complete")
    with pytest.raises(InputError, match="is the input folder"):
        check_output_dir(tmp_path / "link", overwrite, inputs=[data / "complete"])
    assert (data / "complete" / "a.nii.gz").read_bytes() == b"skull"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "link"]  # nothing written, no lock left
    check_output_dir(tmp_path / "elsewhere", overwrite, inputs=[data / "complete", None])  # apart: fine


def test_a_second_writer_of_one_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "a.txt").write_text("first")
        with pytest.raises(InputError, match="another skullrec command is writing this output folder") as err:
            with staged_output(out):
                pass
        assert "\n" not in str(err.value)
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file is gone with the writer


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from skullrec.data.layout import staged_output
    with staged_output(Path(sys.argv[1])) as staging:
        (staging / "partial.nii.gz").write_bytes(b"half")
        print(staging, flush=True)
        time.sleep(120)
    """
)


def test_lock_dies_with_its_process_and_stale_staging_is_removed_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        staging = Path(proc.stdout.readline().strip())
        assert staging.is_dir() and staging.name.startswith(".out.staging-")
        with pytest.raises(InputError, match="another skullrec command"):  # held by a live process
            with staged_output(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert staging.is_dir()  # kill -9 left its partial output behind
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        with staged_output(out) as new:
            (new / "done.txt").write_text("ok")
    assert not staging.exists()
    assert any(str(staging) in r.getMessage() and "did not finish" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "done.txt").read_text() == "ok"


def test_outputs_get_the_users_umask(tmp_path: Path) -> None:
    from skullrec.io import write_nifti

    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out") as staging:
            write_nifti(staging / "complete" / "a.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755
    assert mode(tmp_path / "out" / "complete") == 0o755
    assert mode(tmp_path / "out" / "complete" / "a.nii.gz") == 0o644


# ------------------------------------------------------------------------------------------
# garbage is never written as a result
# ------------------------------------------------------------------------------------------

SIZE = 32


def _tiny_checkpoint(path: Path, poison: str | None = None) -> Path:
    """A real (untrained) checkpoint; ``poison``: 'one' puts one NaN into decodeL, 'all' makes every weight NaN."""
    import torch

    from skullrec.config import config_from_dict
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    cfg = config_from_dict({"model": {"size": SIZE, "channels": [2, 2, 2, 2, 2]}})
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        if poison == "one":
            model.decodeL.weight[1, 3] = float("nan")
        elif poison == "all":
            for p in model.parameters():
                p.fill_(float("nan"))
    return save_checkpoint(path, model, cfg, epoch=0)


def _shell(shape=(60, 64, 52), spacing=(2.5, 2.5, 2.5)) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal bone shell of skull size (~150 x 160 x 130 mm) in the canonical order, and its affine."""
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 28) ** 2 + (g[1] / 30) ** 2 + (g[2] / 24) ** 2)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    return ((r <= 1) & (r >= 0.9)).astype(np.uint8), aff


def _write_input(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    from skullrec.io import write_nifti

    return write_nifti(folder / name, data, affine)


def test_non_finite_checkpoint_weights_are_refused_at_load(tmp_path: Path) -> None:
    from skullrec.nets.checkpoint import load_checkpoint

    for poison, where in (("one", "1 NaN/inf values in 'decodeL.weight'"), ("all", "and ")):
        path = _tiny_checkpoint(tmp_path / f"{poison}.safetensors", poison)
        with pytest.raises(InputError, match="checkpoint weights are not finite") as err:
            load_checkpoint(path)
        assert where in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    load_checkpoint(_tiny_checkpoint(tmp_path / "ok.safetensors"))  # a finite one loads


class _Const(__import__("torch").nn.Module):
    """A stand-in model returning one constant logit everywhere (NaN, very negative, or bone)."""

    size = SIZE

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        import torch

        return torch.full_like(x, self.value)


def test_reconstruct_flags_non_finite_logits_empty_results_and_implausible_inputs() -> None:
    from skullrec.inference.predict import input_plausibility, reconstruct
    from skullrec.io import Volume

    shell, aff = _shell()
    skull = Volume(shell, aff)
    ok = reconstruct(_Const(8.0), [skull])[0]
    assert ok.usable and ok.problems == [] and ok.warnings == []
    nan = reconstruct(_Const(float("nan")), [skull])[0]
    assert not nan.usable and "not finite" in nan.problems[0]
    empty = reconstruct(_Const(-8.0), [skull])[0]
    assert not empty.usable and "empty reconstruction" in empty.problems[0]
    # One bone voxel: far from a skull, whatever the model says.
    speck = np.zeros_like(shell)
    speck[30, 30, 30] = 1
    rec = reconstruct(_Const(8.0), [Volume(speck, aff)])[0]
    assert not rec.usable and "far from a plausible skull" in rec.problems[0]
    assert "16 mm^3 of bone (1 voxels)" in rec.problems[0]  # 2.5^3 = 15.6 mm^3
    # Bone volume and extent computed independently: a 40 mm cube shell is a warning, not a problem.
    small = np.zeros((40, 40, 40), np.uint8)
    small[2:38, 2:38, 2:38] = 1
    small[4:36, 4:36, 4:36] = 0
    problems, warnings = input_plausibility(Volume(small, np.diag([1.0, 1.0, 1.0, 1.0])))
    assert problems == [] and len(warnings) == 2
    assert f"{(36**3 - 32**3) / 1000:.0f} cm^3" in warnings[0] and "spans 36 mm" in warnings[1]


def _predict(args: list[str]):
    from typer.testing import CliRunner

    from skullrec.cli import app

    return CliRunner().invoke(app, ["predict", "--device", "cpu", *args])


def test_predict_writes_no_garbage_and_fails_when_nothing_is_usable(tmp_path: Path) -> None:
    shell, aff = _shell()
    inp = tmp_path / "in"
    _write_input(inp, "skull.nii.gz", shell, aff)
    speck = np.zeros_like(shell)
    speck[30, 30, 30] = 1
    _write_input(inp, "speck.nii.gz", speck, aff)
    # NaN weights: refused before anything is written.
    for poison in ("one", "all"):
        ckpt = _tiny_checkpoint(tmp_path / f"{poison}.safetensors", poison)
        res = _predict(["--checkpoint", str(ckpt), "--in", str(inp), "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and "checkpoint weights are not finite" in res.output, res.output
        assert not (tmp_path / "o").exists()
    # A model that outputs bone: the skull is written, the speck is reported and not written.
    import json

    from skullrec.config import config_from_dict
    from skullrec.inference.predict import predict_folder
    from skullrec.nets import checkpoint

    cfg = config_from_dict({"model": {"size": SIZE}})
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(checkpoint, "load_checkpoint", lambda path, device="cpu": (_Const(8.0), cfg, {}))
        predict_folder(checkpoint=tmp_path / "x", inp=inp, out=tmp_path / "o", device="cpu")
        assert sorted(p.name for p in (tmp_path / "o" / "complete").iterdir()) == ["skull.nii.gz"]
        report = json.loads((tmp_path / "o" / "predict.json").read_text())
        assert [c["case_id"] for c in report["cases"]] == ["skull"]
        assert report["failed"][0]["case_id"] == "speck" and "far from a plausible skull" in report["failed"][0]["problems"][0]
        # No usable result at all (NaN logits): exit-2 error, nothing written, no staging left.
        mp.setattr(checkpoint, "load_checkpoint", lambda path, device="cpu": (_Const(float("nan")), cfg, {}))
        (inp / "speck.nii.gz").unlink()
        with pytest.raises(InputError, match="no usable result: the model output is not finite"):
            predict_folder(checkpoint=tmp_path / "x", inp=inp, out=tmp_path / "o2", device="cpu")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["all.safetensors", "in", "o", "one.safetensors"]
    finally:
        mp.undo()


# ------------------------------------------------------------------------------------------
# bounded work from a header
# ------------------------------------------------------------------------------------------


def _lying_nifti(path: Path, shape: tuple[int, int, int], dtype=np.uint8) -> Path:
    """A few-hundred-byte NIfTI whose header claims ``shape`` (the voxel data are not there)."""
    import gzip

    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * 1000
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _lying_nrrd(path: Path, shape: tuple[int, int, int]) -> Path:
    path.write_text("NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: " + " ".join(map(str, shape))
                    + "\nencoding: gzip\n\n")
    return path


@pytest.mark.parametrize("name, shape, message", [
    ("huge.nii.gz", (1500, 1500, 1500), "header claims 1500 x 1500 x 1500 voxels (3.1 GiB); the limit is 536,870,912 voxels"),
    ("huge.nii", (5000, 5000, 5000), "header claims 5000 x 5000 x 5000 voxels"),
    ("short.nii.gz", (800, 800, 800), "truncated: the header needs 512,000,352 bytes of data, the file holds 1,352"),
    ("huge.nrrd", (1500, 1500, 1500), "header claims 1500 x 1500 x 1500 voxels"),
])
def test_a_tiny_file_with_a_huge_header_is_refused_before_allocation(tmp_path: Path, name: str, shape, message: str) -> None:
    import tracemalloc

    from skullrec.io import read_volume

    path = (_lying_nrrd if name.endswith(".nrrd") else _lying_nifti)(tmp_path / name, shape)
    assert path.stat().st_size < 2000
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value), str(err.value)
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # numpy arrays are traced: nothing big was made


def test_the_viewer_upload_is_bounded_by_the_header_too(tmp_path: Path) -> None:
    from skullrec.viewer.helpers import read_upload

    payload = _lying_nifti(tmp_path / "x.nii.gz", (1500, 1500, 1500)).read_bytes()
    with pytest.raises(InputError, match=r"^scan.nii.gz: header claims 1500 x 1500 x 1500 voxels"):
        read_upload("scan.nii.gz", payload)


# ------------------------------------------------------------------------------------------
# no traceback for user-facing failures
# ------------------------------------------------------------------------------------------


def test_config_values_are_validated_wherever_they_come_from(tmp_path: Path) -> None:
    import json

    from skullrec.config import ConfigError, load_config

    assert load_config(None, ["train.lr=1e-3"]).train.lr == pytest.approx(0.001)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n  weight_decay: 1E-5\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.lr, cfg.train.weight_decay) == (pytest.approx(3e-4), pytest.approx(1e-5))
    for override, message in (("model.channels=[20,40,80,160,-8]", "model.channels: every entry must be >= 1"),
                              ("model.strides=[2,2,2,2,0]", "model.strides: every entry must be 1 or 2"),
                              ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
                              ("train.lr=.inf", "train.lr: must be a finite number")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    # A checkpoint whose metadata carries such a config is refused in one line (the tensors are intact).
    from skullrec.nets.checkpoint import load_checkpoint

    good = _tiny_checkpoint(tmp_path / "m.safetensors")
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta_cfg = json.loads(header["__metadata__"]["config"])
    meta_cfg["model"]["channels"] = [2, 2, 2, 2, -8]
    header["__metadata__"]["config"] = json.dumps(meta_cfg)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    with pytest.raises(InputError, match=r"bad\.safetensors: checkpoint config invalid .*model\.channels: every entry must be >= 1"):
        load_checkpoint(bad)


def test_unsupported_files_are_listed_in_one_warning_and_a_file_is_not_a_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from skullrec.io import list_volumes

    shell, aff = _shell((8, 8, 8))
    _write_input(tmp_path, "a.nii.gz", shell, aff)
    for name in ("notes.txt", "scan.png", ".DS_Store", "b.raw.gz"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        assert list(list_volumes(tmp_path)) == ["a"]
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {tmp_path}: skipped 2 file(s) of unsupported type: notes.txt, scan.png (reading .nii, .nii.gz, .nrrd, .nhdr)"
    ]
    with pytest.raises(InputError, match=r"a\.nii\.gz: is a file; give the folder that holds the volume files"):
        list_volumes(tmp_path / "a.nii.gz")


def test_an_all_background_upload_is_named_in_the_error(tmp_path: Path) -> None:
    import gzip

    import nibabel as nib

    from skullrec.inference.predict import reconstruct
    from skullrec.viewer.helpers import read_upload

    blank = np.zeros((16, 16, 16), np.uint8)
    vol = read_upload("blank.nii.gz", gzip.compress(nib.Nifti1Image(blank, np.eye(4)).to_bytes()))
    with pytest.raises(InputError, match=r"^blank\.nii\.gz: no bone voxels"):
        reconstruct(_Const(8.0), [vol])


def test_unwritable_output_or_full_disk_is_one_line_exit_2_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from skullrec import io as sio

    shell, aff = _shell()
    inp = tmp_path / "in"
    _write_input(inp, "skull.nii.gz", shell, aff)
    ckpt = _tiny_checkpoint(tmp_path / "m.safetensors")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"

    def denied(*args, **kwargs):  # what mkdtemp raises in a folder the user may not write (tests run as root)
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir", tmp_path)))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", denied)
        res = _predict(["--checkpoint", str(ckpt), "--in", str(inp), "--out", str(out)])
    assert res.exit_code == 2 and res.stderr == f"error: {tmp_path}: Permission denied\n", res.output

    def full(img, filename):
        Path(filename).write_bytes(b"part")
        raise OSError(28, "No space left on device", str(filename))

    with monkeypatch.context() as m:
        m.setattr(sio.nib, "save", full)
        res = _predict(["--checkpoint", str(ckpt), "--in", str(inp), "--out", str(out)])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and res.stderr.endswith(": No space left on device\n")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no output, staging or lock left behind


_LAUNCHER = textwrap.dedent(
    """
    import sys
    from skullrec.viewer import launch as L
    server = "import os, time; print(os.getpid(), flush=True); time.sleep(300)"
    L.streamlit_command = lambda *a, **k: [sys.executable, "-c", server]
    sys.exit(L.launch(L.ViewerSettings(), "127.0.0.1", 8501))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_view_forwards_sigterm_and_sigint_to_its_server(sig: int) -> None:
    # A runner started in the background by a non-interactive shell (nohup ... &) ignores SIGINT, and so
    # would the launcher it starts: give the launcher the default disposition that a terminal gives it.
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        server = int(proc.stdout.readline())
        os.kill(server, 0)  # running
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(server, 0)  # the server went with the launcher (reaped by it, so not even a zombie)
