"""Every command on every kind of bad input: exit code 2, one line ``error: ...`` on stderr, no
traceback, and nothing written (the whole working folder is byte-for-byte as before)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from skullrec.cli import app

SIZE = 32


def _shell() -> tuple[np.ndarray, np.ndarray]:
    shape = (60, 64, 52)
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 28) ** 2 + (g[1] / 30) ** 2 + (g[2] / 24) ** 2)
    return ((r <= 1) & (r >= 0.9)).astype(np.uint8), np.diag([-2.5, -2.5, 2.5, 1.0])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good and bad inputs of every kind, made once."""
    import torch

    from skullrec.config import config_from_dict
    from skullrec.io import write_nifti
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_checkpoint

    w = tmp_path_factory.mktemp("bad_inputs")
    shell, aff = _shell()
    write_nifti(w / "good" / "skull.nii.gz", shell, aff)
    write_nifti(w / "D" / "complete" / "skull.nii.gz", shell, aff)
    (w / "empty").mkdir()
    (w / "corrupt").mkdir()
    (w / "corrupt" / "skull.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    (w / "huge").mkdir()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1500, 1500, 1500))
    hdr["vox_offset"] = 352
    (w / "huge" / "skull.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 1004))
    (w / "blank").mkdir()
    write_nifti(w / "blank" / "skull.nii.gz", np.zeros((8, 8, 8), np.uint8), aff)
    cfg = config_from_dict({"model": {"size": SIZE, "channels": [2, 2, 2, 2, 2]}})
    model = build_model(cfg.model, seed=0)
    save_checkpoint(w / "m.safetensors", model, cfg, epoch=0)
    with torch.no_grad():
        model.decodeL.weight[0, 0] = float("nan")
    save_checkpoint(w / "nan.safetensors", model, cfg, epoch=0)
    (w / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (w / "lr.yaml").write_text("train:\n  lr: abc\n")
    (w / "broken.yaml").write_text("train: [unclosed\n")
    (w / "busy").mkdir()
    (w / "busy" / "old.txt").write_text("results of an earlier run")
    return w


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


G, E, C, H, B = "good", "empty", "corrupt", "huge", "blank"
CK, NAN, JUNK = "m.safetensors", "nan.safetensors", "junk.safetensors"

# (command line with {w} for the world folder, what the one error line must say)
CASES = [
    # synth
    ("synth --out {w}/s --n-train -1", "--n-train"),
    ("synth --out {w}/good/skull.nii.gz", "exists and is not a folder"),
    ("synth --out {w}/busy", "output folder is not empty"),
    # defects
    ("defects --in {w}/nope --out {w}/o", "nope: no such folder"),
    ("defects --in {w}/good/skull.nii.gz --out {w}/o", "is a file; give the folder"),
    ("defects --in {w}/empty --out {w}/o", "no volume files"),
    ("defects --in {w}/corrupt --out {w}/o", "skull.nii.gz: "),
    ("defects --in {w}/huge --out {w}/o", "header claims 1500 x 1500 x 1500 voxels"),
    ("defects --in {w}/blank --out {w}/o", "no bone voxels"),
    ("defects --in {w}/good --out {w}/good --overwrite", "is the input folder"),
    ("defects --in {w}/good --out {w}/good/sub --overwrite", "lies inside the input folder"),
    ("defects --in {w}/good --out {w}/busy", "output folder is not empty"),
    # prepare
    ("prepare --in {w}/D/complete --out {w}/D --overwrite", "contains the input folder"),
    ("prepare --in {w}/good --out {w}/o --defective {w}/nope", "nope: no such folder"),
    ("prepare --in {w}/corrupt --out {w}/o", "skull.nii.gz: "),
    ("prepare --in {w}/huge --out {w}/o", "header claims"),
    ("prepare --in {w}/good --out {w}/o --size 4", "--size"),
    ("prepare --in {w}/good --out {w}/o --eval-fraction 2", "--eval-fraction"),
    # train
    ("train --config {w}/nope.yaml --run-dir {w}/r", "no such config file"),
    ("train --config {w}/broken.yaml --run-dir {w}/r", "invalid YAML"),
    ("train --config {w}/lr.yaml --run-dir {w}/r", "train.lr: expected a number, got 'abc'"),
    ("train --set model.channels=[20,40,80,160,-8] --config {w}/lr.yaml --set train.lr=1e-3 --run-dir {w}/r", "model.channels: every entry must be >= 1"),
    ("train --resume {w}/nope", "not a run folder"),
    # flatness
    ("flatness --checkpoint {w}/nope.safetensors --data {w}/good", "no such checkpoint file"),
    ("flatness --checkpoint {w}/junk.safetensors --data {w}/good", "junk.safetensors: "),
    ("flatness --checkpoint {w}/nan.safetensors --data {w}/good", "checkpoint weights are not finite"),
    # predict
    ("predict --checkpoint {w}/nope.safetensors --in {w}/good --out {w}/o", "no such checkpoint file"),
    ("predict --checkpoint {w}/junk.safetensors --in {w}/good --out {w}/o", "junk.safetensors: "),
    ("predict --checkpoint {w}/nan.safetensors --in {w}/good --out {w}/o", "checkpoint weights are not finite"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/nope --out {w}/o", "no such folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good/skull.nii.gz --out {w}/o", "is a file; give the folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/empty --out {w}/o", "no volume files"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/corrupt --out {w}/o", "skull.nii.gz: "),
    ("predict --checkpoint {w}/m.safetensors --in {w}/huge --out {w}/o", "header claims"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/blank --out {w}/o", "no bone voxels"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/good --overwrite", "is the input folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w} --overwrite", "contains the input folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/busy", "output folder is not empty"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --batch-size 0", "--batch-size"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --mirror", "--mirror: mirrors stage 2's box"),
    # evaluate
    ("evaluate --pred {w}/nope --truth {w}/good --out {w}/e.csv", "no such folder"),
    ("evaluate --pred {w}/corrupt --truth {w}/good --out {w}/e.csv", "skull.nii.gz: "),
    ("evaluate --pred {w}/good --truth {w}/huge --out {w}/e.csv", "header claims"),
    ("evaluate --pred {w}/good --truth {w}/good --out {w}/e.csv --hd95 bogus", "--hd95"),
    ("evaluate --pred {w}/good --truth {w}/good/skull.nii.gz --out {w}/e.csv", "is a file; give the folder"),
    # experiment
    ("experiment --config {w}/nope.yaml", "nope.yaml"),
    ("experiment --config {w}/broken.yaml", "broken.yaml"),
    # defect kinds (prepare-implant / prepare-eval --kinds): checked before anything is read
    ("prepare-implant --prepared {w}/D --stage1 {w}/m.safetensors --out {w}/o --kinds set1,fronto-orbital", "held-out kind (kept out of training"),
    ("prepare-eval --prepared {w}/D --out {w}/o --kinds set1,round", "--kinds: unknown kind 'round'"),
    # view
    ("view --data {w}/nope", "no such folder"),
    ("view --port 0", "--port"),
    ("view --results {w}/nope.csv", "no such results CSV"),
]


@pytest.mark.parametrize("line, message", CASES, ids=[c[0].split(" {w}")[0] + ": " + c[1] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback_nothing_written(world: Path, monkeypatch: pytest.MonkeyPatch, line: str, message: str) -> None:
    monkeypatch.chdir(world)  # default output folders (runs/, data/) would land here and be seen
    before = _snapshot(world)
    args = line.format(w=world).split()
    if args[0] in ("predict", "flatness", "train", "experiment"):
        args += ["--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr, res.stderr
    assert _snapshot(world) == before  # nothing written, moved or removed
