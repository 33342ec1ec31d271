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
    _crafted_metadata_world(w)
    return w


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
    # view
    ("view --data {w}/nope", "no such folder"),
    ("view --port 0", "--port"),
    ("view --results {w}/nope.csv", "no such results CSV"),
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
    assert len(res.stderr) < 600, res.stderr  # values in errors are abbreviated (skullrec.errors.short_repr)
    assert message in res.stderr, res.stderr
    assert _snapshot(world) == before  # nothing written, moved or removed
