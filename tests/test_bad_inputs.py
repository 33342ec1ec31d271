"""Every command on every kind of bad input: exit code 2, one line ``error: ...`` on stderr, no
traceback, and nothing written (the whole working folder is byte-for-byte as before)."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import threading
from collections.abc import Iterator
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


# readers: set when anything opens the FIFO that a NRRD header names as its data file (nothing may).
FIFO_OPENED = threading.Event()


def _nrrd_header(data_file: str) -> bytes:
    """A 4 x 4 x 4 uint8 NRRD header whose voxels are in ``data_file``."""
    return ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nspace: left-posterior-superior\n"
            f"space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\ndata file: {data_file}\n\n").encode()


def _watch_fifo(fifo: Path, stop: threading.Event) -> None:
    """Open the FIFO's writing end whenever a reader waits on it: the reader then gets EOF instead of
    hanging the test run, and FIFO_OPENED records that somebody opened it."""
    while not stop.wait(0.02):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails with ENXIO while no reader waits
        except OSError:
            continue
        FIFO_OPENED.set()
        os.close(fd)


def _readers_world(w: Path) -> None:
    """readers: NRRD headers naming data files outside their folder, a FIFO, /dev/zero; hostile NIfTI headers."""
    (w / "outside.raw").write_bytes(b"root:x:0:0:SECRET" + b"\1" * 47)
    for name, data_file in [("nrrd_up", "../outside.raw"), ("nrrd_abs", str(w / "outside.raw")),
                            ("nrrd_zero", "/dev/zero"), ("nrrd_fifo", "skull.raw"),
                            ("nrrd_list", "LIST\n../outside.raw\nskull.raw\nskull.raw\nskull.raw"),
                            ("nrrd_pattern", "../nrrd_up/../s%02d.raw 0 3 1")]:
        (w / name).mkdir()
        header = _nrrd_header(data_file)
        if name == "nrrd_list":  # LIST: the names run to the end of the file (no empty line)
            header = header[:-1]
        (w / name / "skull.nrrd").write_bytes(header)
    os.mkfifo(w / "nrrd_fifo" / "skull.raw")
    (w / "nhdr_up").mkdir()
    (w / "nhdr_up" / "skull.nhdr").write_bytes(_nrrd_header("../outside.raw"))
    (w / "ctl").mkdir()
    (w / "ctl" / "bad\nname.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))

    def nifti(folder: str, hdr: nib.Nifti1Header, payload: bytes) -> None:
        hdr["vox_offset"] = 352
        (w / folder).mkdir()
        (w / folder / "skull.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + payload)

    # uint8 with scaling: as float64 it would be 2.3 GiB (over the limit); read as a mask it stays
    # uint8 (300 MiB), so the 1 KB file is refused as truncated before anything is allocated.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 300))
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(0.5, 0.0)
    hdr.set_sform(np.eye(4), code=1)
    nifti("scaled", hdr, b"\0" * 1000)
    shell, aff = _shell()
    hdr = nib.Nifti1Header()  # a qform with voxel size 0 along axis 0 (nibabel would make it 1 mm)
    hdr.set_data_shape(shell.shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(aff, code=1)
    hdr["sform_code"] = 0
    hdr["pixdim"][1] = 0.0
    nifti("pixdim0", hdr, shell.tobytes("F"))
    hdr = nib.Nifti1Header()  # a sheared sform and qform code 0
    hdr.set_data_shape(shell.shape)
    hdr.set_data_dtype(np.uint8)
    sheared = aff.copy()
    sheared[0, 1] = 0.8
    hdr.set_sform(sheared, code=1)
    hdr["qform_code"] = 0
    nifti("sheared", hdr, shell.tobytes("F"))


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
    # output-path guards: inputs that an --out (with --overwrite) would delete or replace
    (w / "o2").mkdir()
    (w / "o2" / "stage2.safetensors").write_bytes(b"a stage-2 checkpoint inside an output folder")
    (w / "o3").mkdir()
    write_nifti(w / "o3" / "real.nii.gz", shell, aff)
    (w / "linked").mkdir()
    (w / "linked" / "skull.nii.gz").symlink_to(w / "o3" / "real.nii.gz")  # an input file that lives in --out
    (w / "rc").mkdir()
    (w / "rc" / "ok.yaml").write_text("seed: 0\n")  # a valid config (stage 1 and stage 2) in a would-be run folder
    _ct_inputs(w)
    _readers_world(w)
    _crafted_metadata_world(w)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_fifo, args=(w / "nrrd_fifo" / "skull.raw", stop), daemon=True)
    watcher.start()
    yield w
    stop.set()
    watcher.join()


def _ct_inputs(w: Path) -> None:
    """CT/DICOM (i-ct): a CT series, a folder with two series, a series with a missing slice."""
    from ct_helpers import UID_ROOT, write_dicom_series

    hu = np.full((10, 12, 6), -1000, np.int16)
    write_dicom_series(w / "dcm_ct", hu, uid=UID_ROOT + ".1")
    write_dicom_series(w / "dcm_two", hu, uid=UID_ROOT + ".1")
    for p in write_dicom_series(w / "dcm_b", hu[:, :, :4], uid=UID_ROOT + ".2"):
        p.rename(w / "dcm_two" / f"b_{p.name}")
    (w / "dcm_b").rmdir()
    write_dicom_series(w / "dcm_gap", hu, uid=UID_ROOT + ".3")
    (w / "dcm_gap" / "slice0002.dcm").unlink()


# --- crafted metadata and configs (checkpoint/config bounds, truncated error values) -------------------------


def _with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of safetensors file ``src`` whose ``__metadata__`` strings are replaced by ``changes`` (tensor bytes kept)."""
    import json

    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    return dst


def _alias_bomb(depth: int) -> str:
    """A config whose model.channels[0] is 9^(depth+1) integers from a few hundred bytes (a "billion laughs" document)."""
    value = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, depth + 1):  # each level: the previous one, defined inline, and 8 aliases of it
        value = f"&a{i} [{value}, {', '.join([f'*a{i - 1}'] * 8)}]"
    return f"model:\n  channels: [{value}]\n"


def _crafted_metadata_world(w: Path) -> None:
    """Checkpoints with crafted but self-consistent metadata, a run folder whose config.yaml was edited, YAML bombs."""
    import json

    import torch

    from conftest import write_shell_dataset
    from skullrec.config import ImplantNetConfig, Stage2Config, config_from_dict, dump_config
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.checkpoint import save_implant_checkpoint, save_training_state
    from skullrec.nets.implant_net import build_implant_net

    good = w / CK
    stored = json.loads(json.loads(good.read_bytes()[8 : 8 + int.from_bytes(good.read_bytes()[:8], "little")])["__metadata__"]["config"])

    def claims(name: str, **model: object) -> None:
        _with_metadata(good, w / name, config=json.dumps({**stored, "model": {**stored["model"], **model}}))

    # 4096 channels at 512^3: 137 G weights (the 86 GB traceback) from a file of a few kB
    claims("huge.safetensors", size=512, channels=[2, 2, 2, 2, 4096], latent_size=4096)
    claims("wide.safetensors", channels=[8, 8, 8, 8, 8])  # within every bound, but not the file's tensors
    claims("e8.safetensors", channels=[4, 8, 8, 8, 100000000])
    _with_metadata(good, w / "deep.safetensors", config="[" * 200_000 + "]" * 200_000)
    _with_metadata(good, w / "cfglist.safetensors", config="[1, 2]")
    _with_metadata(good, w / "cfgnull.safetensors", config="null")
    s2 = Stage2Config(net=ImplantNetConfig(grid=8, box_mm=64.0, channels=[2, 2, 2, 2], strides=[2, 2, 2], num_res_units=0))
    save_implant_checkpoint(w / "s2.safetensors", build_implant_net(s2.net, seed=0), s2)
    for name, net in (("s2grid", {"grid": 2048}), ("s2box", {"box_mm": 1e9}), ("s2zero", {"strides": [0, 0, 0]}),
                      ("s2three", {"strides": [3, 3, 3]})):
        _with_metadata(w / "s2.safetensors", w / f"{name}.safetensors", config=json.dumps({**s2.to_dict(), "net": {**s2.to_dict()["net"], **net}}))
    (w / "plain.yaml").write_text("seed: 0\n")  # a valid config of either stage, for --set
    (w / "bomb.yaml").write_text(_alias_bomb(9))  # 3.5 G integers once expanded
    (w / "bomb3.yaml").write_text(_alias_bomb(3))  # 6561 integers: under the node bound, yet a 21 kB repr
    # A run folder (tiny 16^3 data) whose config.yaml was then edited to another architecture, with a state.pt
    # that saves its config and one written before state.pt did (only the weights' shapes tell).
    write_shell_dataset(w / "shells", counts=(("train", 2), ("eval_set1", 1), ("eval_set2", 1)))
    cfg = config_from_dict({"data": {"root": str(w / "shells")}, "model": {"size": 16, "channels": [2, 2, 2], "strides": [2, 2, 2]},
                            "train": {"epochs": 2, "compile": False, "amp": "none"}})
    edited = config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "channels": [4, 4, 4]}})
    model = build_model(cfg.model, seed=0)
    opt = torch.optim.Adam(model.parameters())
    for run, extra in (("run", {"config": cfg.to_dict()}), ("run_old", {})):
        (w / run).mkdir()
        (w / run / ".skullrec-train.lock").touch()  # what any earlier trainer left (opening it changes nothing)
        save_training_state(w / run / "state.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1, "step": 0, **extra})
        (w / run / "config.yaml").write_text(dump_config(edited))


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
    ("train --config {w}/lr.yaml --set train.lr=1e-3 --set data.val_fraction=1.5 --run-dir {w}/r", "data.val_fraction: must be in [0, 1)"),
    # flatness
    ("flatness --checkpoint {w}/nope.safetensors --data {w}/good", "no such checkpoint file"),
    ("flatness --checkpoint {w}/junk.safetensors --data {w}/good", "junk.safetensors: "),
    ("flatness --checkpoint {w}/nan.safetensors --data {w}/good", "checkpoint weights are not finite"),
    # predict
    ("predict --checkpoint {w}/nope.safetensors --in {w}/good --out {w}/o", "no such checkpoint file"),
    ("predict --checkpoint {w}/junk.safetensors --in {w}/good --out {w}/o", "junk.safetensors: "),
    ("predict --checkpoint {w}/nan.safetensors --in {w}/good --out {w}/o", "checkpoint weights are not finite"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/nope --out {w}/o", "no such folder"),
    # (a single volume file is a valid --in for predict: test_predict_takes_one_file below)
    ("predict --checkpoint {w}/m.safetensors --in {w}/lr.yaml --out {w}/o", "lr.yaml: unknown file type"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --smooth", "--smooth: smooths the STL meshes"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/empty --out {w}/o", "no volume files"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/corrupt --out {w}/o", "skull.nii.gz: "),
    ("predict --checkpoint {w}/m.safetensors --in {w}/huge --out {w}/o", "header claims"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/blank --out {w}/o", "no bone voxels"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/good --overwrite", "is the input folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w} --overwrite", "contains the input folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/busy", "output folder is not empty"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --batch-size 0", "--batch-size"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --mirror", "--mirror: mirrors stage 2's box"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --format tiff", "--format: must be one of auto, nifti, nrrd"),
    # export-bundle (MONAI bundle)
    ("export-bundle --out {w}/o --checkpoint {w}/nope.safetensors", "no such checkpoint file"),
    ("export-bundle --out {w}/o --checkpoint {w}/junk.safetensors", "junk.safetensors: "),
    ("export-bundle --out {w}/o --checkpoint {w}/nan.safetensors", "checkpoint weights are not finite"),
    ("export-bundle --out {w}/o --stage2 {w}/m.safetensors", "--stage2: needs --checkpoint"),
    ("export-bundle --out {w}/o --checkpoint {w}/m.safetensors --stage2 {w}/m.safetensors", "not a stage-2 (implant) checkpoint"),
    ("export-bundle --out {w}/busy --checkpoint {w}/m.safetensors", "output folder is not empty"),
    ("export-bundle --out {w} --checkpoint {w}/m.safetensors --overwrite", "contains the input file"),
    ("export-bundle --out {w}/good/skull.nii.gz --checkpoint {w}/m.safetensors", "exists and is not a folder"),
    # predict: CT and DICOM input (i-ct)
    ("predict --checkpoint {w}/m.safetensors --in {w}/dcm_two --out {w}/o --ct", "2 DICOM series in this folder; choose one with --series UID"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/dcm_two --out {w}/o --ct --series 9.9.9", "--series 9.9.9: no such series"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --series 9.9.9", "--series: "),
    ("predict --checkpoint {w}/m.safetensors --in {w}/dcm_gap --out {w}/o --ct", "dcm_gap: slices are not evenly spaced"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/dcm_ct --out {w}/o", "or --ct for a CT in HU"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/dcm_ct --out {w}/o --ct", "no voxel reaches the bone threshold of 300 HU"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --ct", "look like a binary mask, not a CT in HU"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --bone-hu 400", "--bone-hu: only with --ct"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --ct --bone-hu 5000", "--bone-hu: must be between"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/good --out {w}/o --ct --threshold 0.5", "--threshold: binarises masks"),
    # evaluate
    ("evaluate --pred {w}/nope --truth {w}/good --out {w}/e.csv", "no such folder"),
    ("evaluate --pred {w}/corrupt --truth {w}/good --out {w}/e.csv", "skull.nii.gz: "),
    ("evaluate --pred {w}/good --truth {w}/huge --out {w}/e.csv", "header claims"),
    ("evaluate --pred {w}/good --truth {w}/good --out {w}/e.csv --hd95 bogus", "--hd95"),
    ("evaluate --pred {w}/good --truth {w}/good/skull.nii.gz --out {w}/e.csv", "is a file; give the folder"),
    # output-path guards (i-guards): every input named on the command line, symlinks resolved, is protected
    ("predict --checkpoint {w}/m.safetensors --stage2 {w}/o2/stage2.safetensors --in {w}/good --out {w}/o2 --overwrite",
     "contains the input file"),
    ("predict --checkpoint {w}/o2/stage2.safetensors --in {w}/good --out {w}/o2/stage2.safetensors --overwrite", "is the input file"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/linked --out {w}/o3 --overwrite", "(linked from"),
    ("defects --in {w}/linked --out {w}/o3 --overwrite", "contains the input file"),
    ("sites --in {w}/D --out {w}/D --overwrite", "is the input folder"),
    ("sites --in {w}/D --out {w} --overwrite", "contains the input folder"),
    ("evaluate --pred {w}/good --truth {w}/D/complete --out {w}/D/complete/skull.nii.gz --overwrite", "lies inside the input folder"),
    ("evaluate --pred {w}/linked --truth {w}/good --out {w}/o3/real.nii.gz --overwrite", "output file is the input file"),
    ("evaluate --pred {w}/good --truth {w}/D/complete --out {w}/D/complete --overwrite", "output file is the input folder"),
    ("train --config {w}/rc/ok.yaml --run-dir {w}/rc --overwrite", "contains the input file"),
    ("train --config {w}/rc/ok.yaml --set data.root={w}/D --run-dir {w}/D/run", "lies inside the input folder"),
    ("train-implant --config {w}/rc/ok.yaml --set data={w}/D --set out={w}/D --overwrite", "is the input folder"),
    ("train-implant --config {w}/rc/ok.yaml --set data={w}/D --set out={w}/rc --overwrite", "contains the input file"),
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
    # view: CT and DICOM input (i-ct)
    ("view --in {w}/dcm_two --ct", "2 DICOM series in this folder; choose one with --series UID"),
    ("view --in {w}/nope --ct", "no such file or folder (given as --in)"),
    ("view --in {w}/good --ct", "neither a volume file"),
    ("view --ct", "--ct: applies to --in"),
    ("view --in {w}/dcm_ct --bone-hu 300", "--bone-hu: only with --ct"),
    # readers: NRRD data files outside the header's folder or not regular files, hostile NIfTI headers
    ("predict --checkpoint {w}/m.safetensors --in {w}/nrrd_up --out {w}/o", "data file '../outside.raw' lies outside the header's folder"),
    ("evaluate --pred {w}/nrrd_up --truth {w}/good --out {w}/e.csv --threshold 0.5", "lies outside the header's folder"),
    ("defects --in {w}/nrrd_abs --out {w}/o", "outside.raw' lies outside the header's folder"),
    ("defects --in {w}/nrrd_zero --out {w}/o", "data file '/dev/zero' lies outside the header's folder"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/nrrd_fifo --out {w}/o", "data file 'skull.raw' is a FIFO, not a regular file"),
    ("defects --in {w}/nrrd_list --out {w}/o", "data file '../outside.raw' lies outside the header's folder"),
    ("defects --in {w}/nrrd_pattern --out {w}/o", "data file '../nrrd_up/../s00.raw' lies outside the header's folder"),
    ("prepare --in {w}/nhdr_up --out {w}/o", "skull.nhdr: data file '../outside.raw' lies outside"),
    ("defects --in {w}/ctl --out {w}/o", "bad\\nname.nii.gz: not a readable NIfTI file"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/scaled --out {w}/o", "truncated: the header needs 314,573,152 bytes"),
    ("defects --in {w}/pixdim0 --out {w}/o", "voxel size (pixdim) 0, 2.5, 2.5 is zero or not finite along axis 0"),
    ("predict --checkpoint {w}/m.safetensors --in {w}/sheared --out {w}/o", "sheared voxel grid"),
    # crafted metadata and configs: bounds before allocation, short error values
    ("predict --checkpoint {w}/huge.safetensors --in {w}/good --out {w}/o", "parameters"),
    ("predict --checkpoint {w}/wide.safetensors --in {w}/good --out {w}/o", "weights do not fit architecture"),
    ("flatness --checkpoint {w}/e8.safetensors --data {w}/good", "model.channels: every entry must be <= 4096"),
    ("predict --checkpoint {w}/deep.safetensors --in {w}/good --out {w}/o", "'config' is nested too deeply"),
    ("predict --checkpoint {w}/cfglist.safetensors --in {w}/good --out {w}/o", "'config' is a list, not a JSON object"),
    ("predict --checkpoint {w}/cfgnull.safetensors --in {w}/good --out {w}/o", "'config' is null, not a JSON object"),
    ("predict --checkpoint {w}/m.safetensors --stage2 {w}/s2grid.safetensors --in {w}/good --out {w}/o", "net.grid: must be in 1..512"),
    ("predict --checkpoint {w}/m.safetensors --stage2 {w}/s2box.safetensors --in {w}/good --out {w}/o", "net.box_mm: must be in (0, 1000] mm"),
    ("predict --checkpoint {w}/m.safetensors --stage2 {w}/s2zero.safetensors --in {w}/good --out {w}/o", "net.strides: every entry must be 1 or 2"),
    ("predict --checkpoint {w}/m.safetensors --stage2 {w}/s2three.safetensors --in {w}/good --out {w}/o", "net.strides: every entry must be 1 or 2"),
    ("train --resume {w}/run", "model.channels ([2, 2, 2] -> [4, 4, 4])"),
    ("train --resume {w}/run --force", "cannot change the model architecture of a run (model.channels"),
    ("train --resume {w}/run_old", "state.pt: the saved weights do not fit the model architecture"),
    ("train --config {w}/plain.yaml --set model.channels=[4,8,8,8,100000000] --run-dir {w}/r", "model.channels: every entry must be <= 4096"),
    ("train --config {w}/plain.yaml --set model.latent_size=100000000 --run-dir {w}/r", "model.latent_size: must be in 1..4096"),
    ("train --config {w}/plain.yaml --set train.num_threads=100000 --run-dir {w}/r", "train.num_threads: must be <= 1024"),
    ("train --config {w}/plain.yaml --set model.size=512 --set model.channels=[8,8,8,8,4096] --set model.latent_size=4096 --run-dir {w}/r", "parameters"),
    ("train --config {w}/bomb.yaml --run-dir {w}/r", "more than 100000 values once its aliases are expanded"),
    ("train --config {w}/bomb3.yaml --run-dir {w}/r", "model.channels[0]: expected an integer, got [[[...], [...], [...]"),
    ("train-implant --config {w}/plain.yaml --set net.grid=2048", "net.grid: must be in 1..512"),
    ("train-implant --config {w}/plain.yaml --set net.strides=[3,3,3]", "net.strides: every entry must be 1 or 2"),
    ("train-implant --config {w}/plain.yaml --set net.box_mm=1e9", "net.box_mm: must be in (0, 1000] mm"),
]


# A refusal comes before any real work, so every case ends in well under a second on an idle CPU; this
# bound only turns a hang (a FIFO read, a multi-GB allocation, minutes of work) into a failure instead of
# a stuck test run. It is a guard, not a speed measurement.
HANG_BOUND_S = 120


@contextlib.contextmanager
def _refused_within(seconds: int, line: str) -> Iterator[None]:
    def fail(signum: int, frame: object) -> None:
        raise TimeoutError(f"{line!r} ran past {seconds} s: it should be refused before any work")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("line, message", CASES, ids=[c[0].split(" {w}")[0] + ": " + c[1] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback_nothing_written(world: Path, monkeypatch: pytest.MonkeyPatch, line: str, message: str) -> None:
    monkeypatch.chdir(world)  # default output folders (runs/, data/) would land here and be seen
    before = _snapshot(world)
    args = line.format(w=world).split()
    if args[0] in ("predict", "flatness", "train", "experiment"):
        args += ["--device", "cpu"]
    with _refused_within(HANG_BOUND_S, line):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert len(res.stderr) < 600, res.stderr  # values in errors are abbreviated (skullrec.errors.short_repr)
    assert message in res.stderr, res.stderr
    assert "SECRET" not in res.output  # no byte of a file outside the input folder is shown
    assert not FIFO_OPENED.is_set()  # nothing opened the FIFO a header names (it would have hung)
    assert _snapshot(world) == before  # nothing written, moved or removed


# i-stl: predict takes one volume file as --in (defects and evaluate still need folders: rows above).
def test_predict_takes_one_file(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["predict", "--checkpoint", str(world / "m.safetensors"), "--in", str(world / "good" / "skull.nii.gz"),
            "--out", str(out), "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    report = out / "predict.json"
    assert res.exit_code == 0, res.output
    assert (out / "implant" / "skull.nii.gz").is_file() and (out / "complete" / "skull.nii.gz").is_file()
    assert report.is_file() and '"case_id": "skull"' in report.read_text()
