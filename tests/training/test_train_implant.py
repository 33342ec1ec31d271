"""Stage 2 end to end on tiny data: samples from the training skulls only, training, resume equal to
an uninterrupted run, the run-folder rules, safe checkpoints, and ``skullrec predict --stage2``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage as ndi
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.config import config_from_dict
from skullrec.data.layout import write_manifest
from skullrec.data.stage2 import load_stage2_samples
from skullrec.inference.samples import build_stage2_data
from skullrec.errors import InputError
from skullrec.io import read_volume, write_nifti
from skullrec.nets.autoencoder import build_model
from skullrec.nets.checkpoint import save_checkpoint
from skullrec.config import stage2_config_from_dict
from skullrec.nets.checkpoint import load_implant_checkpoint
from skullrec.training.speed import native_bf16
from skullrec.training.stage2 import train_implant

GRID, BOX_MM = 16, 64.0


def _skull(shape, spacing, cap_z):
    g = np.indices(shape).astype(float)
    r = np.sqrt((((g.T - (np.array(shape) - 1) / 2) * spacing) ** 2).sum(-1)).T
    complete = (r < 26) & (r > 21)
    return complete, complete & ~(g[2] > cap_z)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    spacing = (1.3, 1.1, 1.6)
    aff = np.diag([*spacing, 1.0])
    for i, cid in enumerate(["000", "001", "002"]):
        complete, defective = _skull((44, 50, 36), spacing, 26 + i)
        write_nifti(root / "complete" / f"{cid}.nii.gz", complete, aff)
        write_nifti(root / "defective" / f"{cid}.nii.gz", defective, aff)
    # case 002 is an evaluation skull: it must never be read (its files are removed below)
    write_manifest(root / "prepared", [], {"train_ids": ["000", "001"], "eval_ids": ["002"],
                                           "complete_folder": str(root / "complete"), "defective_folder": str(root / "defective")})
    (root / "complete" / "002.nii.gz").unlink()
    (root / "defective" / "002.nii.gz").unlink()
    cfg = config_from_dict({"model": {"size": 32, "channels": [2, 2, 2, 2, 2]}})
    stage1 = save_checkpoint(root / "stage1.safetensors", build_model(cfg.model, seed=0), cfg, epoch=0)
    recs = build_stage2_data(root / "prepared", stage1, root / "samples", kinds=("skullfix",), box_mm=BOX_MM, grid=GRID, seed=0)
    return root, recs


def _cfg(root: Path, **train):
    return stage2_config_from_dict({"data": str(root / "samples"), "seed": 3, "out": str(root / "run"),
                                    "net": {"grid": GRID, "box_mm": BOX_MM, "channels": [4, 8, 8], "strides": [2, 2]},
                                    "train": {"epochs": 3, "batch_size": 1, "lr": 1e-2, "checkpoint_epochs": [2], **train}})


def test_samples_come_from_training_skulls_and_hold_the_implant(tiny):
    root, recs = tiny
    assert [r["case_id"] for r in recs] == ["000", "001"]
    meta, x, y = load_stage2_samples(root / "samples")
    assert x.shape == (2, 2, GRID, GRID, GRID) and y.shape == (2, 1, GRID, GRID, GRID)
    assert meta["train_ids"] == ["000", "001"]
    for r, xi, yi in zip(recs, x, y):
        complete = read_volume(root / "complete" / f"{r['case_id']}.nii.gz").data.astype(bool)
        defective = read_volume(root / "defective" / f"{r['case_id']}.nii.gz").data.astype(bool)
        assert r["implant_voxels"] == int((complete & ~defective).sum()) > 0
        assert r["implant_in_box"] > 0.9 * r["implant_voxels"]  # a 64 mm box around a ~44 mm cap, shifted by up to 10 mm
        assert yi.sum() > 0 and 0 <= xi.min() and xi.max() <= 1
        # target and defective channel do not overlap much (only through the grid resampling)
        assert (yi[0] * xi[0]).sum() < 0.2 * yi.sum()
    # the same seed gives the same samples, also from two worker processes
    again = build_stage2_data(root / "prepared", root / "stage1.safetensors", root / "samples2", kinds=("skullfix",),
                              box_mm=BOX_MM, grid=GRID, seed=0, workers=2)
    assert [a["box"] for a in again] == [r["box"] for r in recs]
    np.testing.assert_array_equal(load_stage2_samples(root / "samples2")[1], x)


def test_train_resume_equals_uninterrupted_and_run_folder_rules(tiny):
    root, _ = tiny
    full = train_implant(_cfg(root), root / "full")
    part = train_implant(_cfg(root), root / "part", stop_after_epoch=1)
    assert part["epoch"] == 1
    resumed = train_implant(_cfg(root), root / "part", resume=True)
    assert resumed["epoch"] == 3 and resumed["loss"] == full["loss"]
    a, b = load_file(root / "full" / "last.safetensors"), load_file(root / "part" / "last.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    records = [json.loads(l) for l in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]  # it learns something even at this size
    assert (root / "full" / "ckpt_epoch002.safetensors").is_file() and (root / "full" / "state.pt").is_file()
    with pytest.raises(InputError, match="--overwrite"):
        train_implant(_cfg(root), root / "full")
    model, cfg, meta = load_implant_checkpoint(root / "full" / "last.safetensors")
    assert meta["epoch"] == 3 and cfg.net.grid == GRID
    # a flipped byte in the weights is refused, not loaded
    raw = bytearray((root / "full" / "last.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (root / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum|corrupt"):
        load_implant_checkpoint(root / "bad.safetensors")
    with pytest.raises(InputError, match="not a stage-2"):
        load_implant_checkpoint(root / "stage1.safetensors")


def test_predict_with_a_stage2_checkpoint(tiny):
    root, _ = tiny
    train_implant(_cfg(root, epochs=1, checkpoint_epochs=[]), root / "p_run")
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--checkpoint", str(root / "stage1.safetensors"), "--stage2", str(root / "p_run" / "last.safetensors"),
                              "--in", str(root / "defective"), "--out", str(root / "pred"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((root / "pred" / "predict.json").read_text())
    assert report["stage2"].endswith("last.safetensors")
    for case in report["cases"]:
        d = read_volume(root / "defective" / f"{case['case_id']}.nii.gz").data.astype(bool)
        imp = read_volume(root / "pred" / "implant" / f"{case['case_id']}.nii.gz").data.astype(bool)
        comp = read_volume(root / "pred" / "complete" / f"{case['case_id']}.nii.gz").data.astype(bool)
        assert not (imp & d).any()
        assert ndi.label(imp, structure=np.ones((3, 3, 3)))[1] <= 1
        np.testing.assert_array_equal(comp, d | imp)
        assert case["implant_voxels"] == int(imp.sum()) and "stage2" in case
        assert case["stage2"]["box"] is not None and imp.any()  # stage 2 really ran and designed something
    res = runner.invoke(app, ["predict", "--checkpoint", str(root / "stage1.safetensors"), "--stage2", str(root / "stage1.safetensors"),
                              "--in", str(root / "defective"), "--out", str(root / "pred2"), "--device", "cpu"])
    assert res.exit_code == 2 and "not a stage-2" in res.output and "Traceback" not in res.output


def test_bf16_training_runs_under_autocast_and_resumes_exactly(tiny):
    root, _ = tiny
    fp32 = train_implant(_cfg(root, epochs=2, checkpoint_epochs=[], amp="none"), root / "amp_fp32")
    bf16 = train_implant(_cfg(root, epochs=2, checkpoint_epochs=[], amp="bf16"), root / "amp_bf16")
    # autocast really ran: the same seed and data give another loss in bf16, but close to fp32's
    assert bf16["loss"] != fp32["loss"] and abs(bf16["loss"] - fp32["loss"]) < 0.1 * fp32["loss"]
    _, cfg, _ = load_implant_checkpoint(root / "amp_bf16" / "last.safetensors")
    assert cfg.train.amp == "bf16"
    # "auto" (the default) is bf16 only where this CPU computes bf16 natively, float32 elsewhere
    auto = train_implant(_cfg(root, epochs=2, checkpoint_epochs=[], amp="auto"), root / "amp_auto")
    assert auto["loss"] == (bf16 if native_bf16(torch.device("cpu")) else fp32)["loss"]
    # the cosine schedule is a function of the step alone: a resumed run equals an uninterrupted one
    kw = dict(epochs=2, checkpoint_epochs=[], amp="bf16", lr_schedule="cosine")
    whole = train_implant(_cfg(root, **kw), root / "cos_whole")
    part = train_implant(_cfg(root, **kw), root / "cos_part", stop_after_epoch=1)
    assert part["epoch"] == 1 and part["lr"] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 1 / 4)))  # step 1 of 4
    resumed = train_implant(_cfg(root, **kw), root / "cos_part", resume=True)
    assert resumed["loss"] == whole["loss"] != bf16["loss"]
    assert whole["lr"] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 3 / 4)))  # the last of 2 x 2 steps


def test_prepare_eval_writes_held_out_defects_at_the_native_grid(tmp_path):
    spacing = (1.3, 1.1, 1.6)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-20.0, 5.0, 3.0)
    for i, cid in enumerate(["000", "001"]):
        complete, defective = _skull((44, 50, 36), spacing, 26 + i)
        write_nifti(tmp_path / "complete" / f"{cid}.nii.gz", complete, aff)
        write_nifti(tmp_path / "defective" / f"{cid}.nii.gz", defective, aff)
    write_manifest(tmp_path / "prepared", [], {"train_ids": ["000"], "eval_ids": ["001"],
                                               "complete_folder": str(tmp_path / "complete"), "defective_folder": str(tmp_path / "defective")})
    (tmp_path / "complete" / "000.nii.gz").unlink()  # a training skull: never read
    res = CliRunner().invoke(app, ["prepare-eval", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "ev"),
                                   "--kinds", "skullfix,set2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert meta["eval_ids"] == ["001"] and [c["kind"] for c in meta["cases"]] == ["skullfix", "set2"]
    complete = read_volume(tmp_path / "ev" / "complete" / "001.nii.gz")
    src = read_volume(tmp_path / "complete" / "001.nii.gz")
    np.testing.assert_array_equal(complete.data, src.data)
    np.testing.assert_allclose(complete.affine, src.affine, atol=1e-5)
    given = read_volume(tmp_path / "defective" / "001.nii.gz").data.astype(bool)
    for kind in ("skullfix", "set2"):
        d = read_volume(tmp_path / "ev" / kind / "defective" / "001.nii.gz")
        imp = read_volume(tmp_path / "ev" / kind / "implant" / "001.nii.gz").data.astype(bool)
        assert d.shape == src.shape
        np.testing.assert_array_equal(imp, complete.data.astype(bool) & ~d.data.astype(bool))
        assert imp.sum() == next(c["implant_voxels"] for c in meta["cases"] if c["kind"] == kind) > 0
    np.testing.assert_array_equal(read_volume(tmp_path / "ev" / "skullfix" / "defective" / "001.nii.gz").data.astype(bool), given)
    # seeded by (seed, case, kind): the same defect again, also from worker processes
    again = CliRunner().invoke(app, ["prepare-eval", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "ev2"), "--kinds", "set2",
                                     "--workers", "2"])
    assert again.exit_code == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "ev2" / "set2" / "implant" / "001.nii.gz").data,
                                  read_volume(tmp_path / "ev" / "set2" / "implant" / "001.nii.gz").data)
    bad = CliRunner().invoke(app, ["prepare-eval", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "ev")])
    assert bad.exit_code == 2 and "--overwrite" in bad.output and "Traceback" not in bad.output


def test_predict_without_checkpoint_uses_the_shipped_pair(tiny, tmp_path, monkeypatch):
    import shutil

    from skullrec.inference.shipped import MODELS_ENV

    root, _ = tiny
    train_implant(_cfg(root, epochs=1, checkpoint_epochs=[]), root / "ship_run")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(root / "stage1.safetensors", models / "stage1.safetensors")
    shutil.copy(root / "ship_run" / "last.safetensors", models / "stage2.safetensors")
    runner = CliRunner()
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "nowhere"))
    res = runner.invoke(app, ["predict", "--in", str(root / "defective"), "--out", str(tmp_path / "none"), "--device", "cpu"])
    assert res.exit_code == 2 and "no shipped weights" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "none").exists()
    monkeypatch.setenv(MODELS_ENV, str(models))
    res = runner.invoke(app, ["predict", "--in", str(root / "defective"), "--out", str(tmp_path / "shipped"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "shipped" / "predict.json").read_text())
    assert report["checkpoint"] == str(models / "stage1.safetensors") and report["stage2"] == str(models / "stage2.safetensors")
    res = runner.invoke(app, ["predict", "--checkpoint", str(models / "stage1.safetensors"), "--stage2", str(models / "stage2.safetensors"),
                              "--in", str(root / "defective"), "--out", str(tmp_path / "explicit"), "--device", "cpu", "--keep-stage1"])
    assert res.exit_code == 0, res.output
    s1 = runner.invoke(app, ["predict", "--checkpoint", str(models / "stage1.safetensors"), "--in", str(root / "defective"),
                             "--out", str(tmp_path / "stage1only"), "--device", "cpu"])
    assert s1.exit_code == 0, s1.output
    for case in report["cases"]:
        a = read_volume(tmp_path / "shipped" / "implant" / f"{case['case_id']}.nii.gz").data
        b = read_volume(tmp_path / "explicit" / "implant" / f"{case['case_id']}.nii.gz").data
        np.testing.assert_array_equal(a, b)
        assert "stage2" in case and case["implant_voxels"] == int(a.sum())
        # --keep-stage1: stage 1's implant of the same run, equal to a stage-1-only prediction
        kept = read_volume(tmp_path / "explicit" / "stage1_implant" / f"{case['case_id']}.nii.gz").data
        np.testing.assert_array_equal(kept, read_volume(tmp_path / "stage1only" / "implant" / f"{case['case_id']}.nii.gz").data)
        assert int(kept.sum()) == case["stage1_implant_voxels"]
    res = runner.invoke(app, ["predict", "--stage2", str(models / "stage2.safetensors"), "--in", str(root / "defective"),
                              "--out", str(tmp_path / "half"), "--device", "cpu"])
    assert res.exit_code == 2 and "--stage2: needs --checkpoint" in res.output


def test_stage1_prior_in_a_box_equals_the_crop_of_predicts_reconstruction(tiny):
    from skullrec.data.resample import Box
    from skullrec.inference.predict import reconstruct, stage1_complete_in_box
    from skullrec.inference.stage2 import crop
    from skullrec.nets.checkpoint import load_checkpoint

    root, _ = tiny
    model, cfg, _ = load_checkpoint(root / "stage1.safetensors")
    vol = read_volume(root / "defective" / "000.nii.gz")
    with torch.no_grad():  # a bias so the untrained stage 1 predicts bone in part of the grid
        [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1].bias.add_(0.02)
    full = reconstruct(model, [vol], batch_size=1, size=cfg.model.size)[0].complete.data.astype(bool)
    assert 0 < full.sum() < full.size
    for box in (Box(lo=(5, 7, 3), hi=(30, 41, 29)), Box(lo=(-6, 20, 10), hi=(20, 60, 44))):  # inside; reaching past two faces
        part = stage1_complete_in_box(model, vol, box, cfg.model.size)
        np.testing.assert_array_equal(part, crop(full, box))


def test_output_bias_starts_at_the_implant_fraction():
    from skullrec.config import ImplantNetConfig
    from skullrec.nets.implant_net import build_implant_net
    from skullrec.training.stage2 import init_output_bias

    net = build_implant_net(ImplantNetConfig(grid=16, box_mm=40.0, channels=[4, 8, 8], strides=[2, 2]), seed=0)
    x = torch.rand((1, 2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
        bias = init_output_bias(net, 0.03)
        after = net(x)
    assert bias == pytest.approx(np.log(0.03 / 0.97))
    # every logit moves by the same amount (the bias of the last convolution, added to an identity residual)
    shift = (after - before).numpy()
    assert np.ptp(shift) < 1e-4 and abs(float(torch.sigmoid(after).median()) - 0.03) < 0.02


def test_mirror_samples_flips_exactly_the_chosen_samples_along_box_axis_0():
    from skullrec.training.stage2 import mirror_samples

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 2, 4, 5, 6, generator=gen), (torch.rand(3, 1, 4, 5, 6, generator=gen) > 0.5).float()
    flip = torch.tensor([True, False, True])
    mx, my = mirror_samples(x, y, flip)
    for i, f in enumerate(flip.tolist()):
        want_x = x[i].numpy()[:, ::-1] if f else x[i].numpy()  # (channel, axis 0, 1, 2): axis 0 reversed
        want_y = y[i].numpy()[:, ::-1] if f else y[i].numpy()
        np.testing.assert_array_equal(mx[i].numpy(), want_x)
        np.testing.assert_array_equal(my[i].numpy(), want_y)
    same = mirror_samples(x, y, torch.zeros(3, dtype=torch.bool))
    assert same[0] is x and same[1] is y


def test_training_with_mirroring_resumes_exactly_and_differs_from_training_without(tiny):
    root, _ = tiny
    full = train_implant(_cfg(root, flip=True), root / "flip_full")
    part = train_implant(_cfg(root, flip=True), root / "flip_part", stop_after_epoch=1)
    resumed = train_implant(_cfg(root, flip=True), root / "flip_part", resume=True)
    assert resumed["loss"] == full["loss"]
    a, b = load_file(root / "flip_full" / "last.safetensors"), load_file(root / "flip_part" / "last.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    records = [json.loads(l) for l in (root / "flip_full" / "metrics.jsonl").read_text().splitlines()]
    mirrored = [r["mirrored"] for r in records]
    assert all(0 <= m <= 2 for m in mirrored) and sum(mirrored) > 0, mirrored  # seeded draws: 2 samples x 3 epochs
    plain = train_implant(_cfg(root), root / "noflip")
    assert "mirrored" not in json.loads((root / "noflip" / "metrics.jsonl").read_text().splitlines()[0])
    c = load_file(root / "noflip" / "last.safetensors")
    assert any(not bool((a[k] == c[k]).all()) for k in a)
