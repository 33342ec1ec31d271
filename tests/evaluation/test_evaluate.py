"""skullrec evaluate: folder pairing, CSV + summary values, failed cases, one-line input errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.evaluation.evaluate import evaluate_arrays, summarise, summary_path
from skullrec.evaluation.metrics import case_metrics
from skullrec.io import write_nifti

SHAPE = (18, 20, 16)
SPACING = (1.2, 0.9, 1.6)
IDS = ("001", "002", "003", "004")


def _affine(shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.diag([*SPACING, 1.0])
    a[:3, 3] = np.array([-10.0, 22.5, 3.0]) + np.asarray(shift)
    return a


def _write_nrrd(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """A NRRD whose geometry equals ``affine`` (RAS) once skullrec.io converts it from ITK's LPS."""
    flip = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.astype(np.uint8).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((flip @ affine[:3, :3] @ np.diag(1 / spacing)).ravel().tolist())
    img.SetOrigin((flip @ affine[:3, 3]).tolist())
    sitk.WriteImage(img, str(path))


def _ellipsoid(centre, radii) -> np.ndarray:
    g = np.indices(SHAPE).astype(float)
    return (((g - np.asarray(centre, float)[:, None, None, None]) / np.asarray(radii, float)[:, None, None, None]) ** 2).sum(0) <= 1


def _cases() -> dict[str, dict[str, np.ndarray]]:
    """Four skull-like cases: complete = thick ellipsoidal shell, defective = minus a cap,
    prediction = a perturbed shell; case 003's prediction is empty (a failed case)."""
    rng = np.random.default_rng(7)
    out = {}
    for i, cid in enumerate(IDS):
        c = np.array([9, 10, 8]) + rng.uniform(-0.5, 0.5, 3)
        complete = _ellipsoid(c, (7, 8, 6.5)) & ~_ellipsoid(c, (5, 6, 4.5))
        defective = complete & ~(np.indices(SHAPE)[2] > 12)
        pred = _ellipsoid(c + rng.uniform(-1, 1, 3), (7, 8, 6)) & ~_ellipsoid(c, (5, 6, 4.5 + 0.3 * i))
        if cid == "003":
            pred[:] = False
        out[cid] = {"pred": pred, "truth": complete, "defective": defective}
    return out


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[dict, Path]:
    """pred: mixed .nii.gz / .nrrd / .nii; truth: .nii.gz; defective: .nrrd."""
    cases = _cases()
    for i, (cid, arrs) in enumerate(cases.items()):
        pred_path = tmp_path / "pred" / f"{cid}{('.nii.gz', '.nrrd', '.nii', '.nrrd')[i]}"
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        if pred_path.suffix == ".nrrd":
            _write_nrrd(pred_path, arrs["pred"], _affine())
        else:
            write_nifti(pred_path, arrs["pred"], _affine())
        write_nifti(tmp_path / "truth" / f"{cid}.nii.gz", arrs["truth"], _affine())
        (tmp_path / "defective").mkdir(exist_ok=True)
        _write_nrrd(tmp_path / "defective" / f"{cid}.nrrd", arrs["defective"], _affine())
    return cases, tmp_path


def _run(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _base(tmp: Path, out: str = "res/results.csv", defective: bool = True) -> list[str]:
    args = ["--pred", str(tmp / "pred"), "--truth", str(tmp / "truth"), "--out", str(tmp / out)]
    return args + (["--defective", str(tmp / "defective")] if defective else [])


@pytest.mark.parametrize("hd95", ["max", "pooled"])
def test_happy_path_csv_and_summary(folders, hd95):
    cases, tmp = folders
    res = _run(*_base(tmp), "--hd95", hd95)
    assert res.exit_code == 0, res.output
    out = tmp / "res" / "results.csv"
    rows = _read_csv(out)
    assert [r["case"] for r in rows] == list(IDS)
    # Every value equals the metrics computed directly on the arrays (files add nothing but I/O).
    for r in rows:
        a = cases[r["case"]]
        ref = case_metrics(a["pred"], a["truth"], SPACING, defective=a["defective"], hd95=hd95)
        for key in ("dsc", "bdsc", "hd_mm", "hd95_mm", "hd_vox", "hd95_vox"):
            assert float(r[key]) == pytest.approx(ref[key], rel=1e-5, abs=1e-9), (r["case"], key)
        assert r["failed"] == ("true" if r["case"] == "003" else "false")
        assert r["hd95_definition"] == hd95 and r["target"] == "skull"
    # The empty prediction is kept, with the worst values, not dropped.
    failed = rows[2]
    diag = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))
    assert float(failed["dsc"]) == 0.0 and float(failed["hd95_mm"]) == pytest.approx(diag)
    assert failed["failure"] == "empty prediction"

    summary = json.loads(summary_path(out).read_text())
    assert summary_path(out) == tmp / "res" / "results.summary.json"
    assert summary["n_cases"] == 4 and summary["n_failed"] == 1 and summary["failed_cases"] == ["003"]
    assert summary["target"] == "skull" and summary["hd95_definition"] == hd95 and summary["n_skipped"] == 0
    for key in ("dsc", "bdsc", "hd_mm", "hd95_mm"):
        v = np.array([float(r[key]) for r in rows])
        s = summary["metrics"][key]
        q1, q3 = np.percentile(v, [25, 75])
        assert s["n"] == 4
        assert s["mean"] == pytest.approx(v.mean()) and s["std"] == pytest.approx(v.std(ddof=1))
        assert s["median"] == pytest.approx(np.median(v)) and s["iqr"] == pytest.approx(q3 - q1)
    assert summary["metrics"]["dsc"]["min"] == 0.0
    assert "failed: 1" in res.output and "003" in res.output and hd95 in res.output


def test_workers_give_the_same_rows_and_name_a_bad_case(folders):
    _, tmp = folders
    assert _run(*_base(tmp, "one/results.csv")).exit_code == 0
    res = _run(*_base(tmp, "two/results.csv"), "--workers", "2")
    assert res.exit_code == 0, res.output
    assert (tmp / "two" / "results.csv").read_text() == (tmp / "one" / "results.csv").read_text()
    # an error inside a worker process is still one line naming the case, exit 2
    (tmp / "truth" / "002.nii.gz").write_bytes(b"not a volume")
    bad = _run(*_base(tmp, "three/results.csv"), "--workers", "2")
    assert bad.exit_code == 2 and "case 002" in bad.output and "Traceback" not in bad.output


def test_target_implant_and_no_defective(folders):
    cases, tmp = folders
    for cid, a in cases.items():
        write_nifti(tmp / "pimp" / f"{cid}.nii.gz", a["pred"] & ~a["defective"], _affine())
        write_nifti(tmp / "timp" / f"{cid}.nii.gz", a["truth"] & ~a["defective"], _affine())
    out = tmp / "imp.csv"
    res = _run("--pred", str(tmp / "pimp"), "--truth", str(tmp / "timp"), "--out", str(out), "--target", "implant")
    assert res.exit_code == 0, res.output
    rows = _read_csv(out)
    a = cases["001"]
    ref = case_metrics(a["pred"] & ~a["defective"], a["truth"] & ~a["defective"], SPACING)
    assert float(rows[0]["dsc"]) == pytest.approx(ref["dsc"])
    assert rows[0]["bdsc"] == "" and rows[0]["target"] == "implant"
    summary = json.loads(summary_path(out).read_text())
    assert summary["target"] == "implant" and summary["metrics"]["bdsc"]["n"] == 0
    assert "no --defective" in res.output


def test_missing_partner_named_or_skipped(folders):
    _, tmp = folders
    (tmp / "truth" / "002.nii.gz").unlink()
    res = _run(*_base(tmp))
    assert res.exit_code == 2
    assert "case 002" in res.stderr and "truth" in res.stderr and "--skip-missing" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = _run(*_base(tmp), "--skip-missing")
    assert res.exit_code == 0, res.output
    assert "skipped (no partner): 1 (002)" in res.output
    summary = json.loads((tmp / "res" / "results.summary.json").read_text())
    assert summary["n_skipped"] == 1 and summary["skipped_cases"] == ["002"] and summary["n_cases"] == 3


def test_shape_mismatch(folders):
    cases, tmp = folders
    write_nifti(tmp / "pred" / "001.nii.gz", cases["001"]["pred"][:, :, :-1], _affine())
    res = _run(*_base(tmp))
    assert res.exit_code == 2
    assert "case 001" in res.stderr and "shape" in res.stderr and "(18, 20, 15)" in res.stderr


def test_affine_mismatch_but_float_noise_accepted(folders):
    cases, tmp = folders
    write_nifti(tmp / "pred" / "001.nii.gz", cases["001"]["pred"], _affine(shift=(0.0, 1e-5, 0.0)))
    assert _run(*_base(tmp)).exit_code == 0
    write_nifti(tmp / "pred" / "001.nii.gz", cases["001"]["pred"], _affine(shift=(0.0, 0.5, 0.0)))
    res = _run(*_base(tmp), "--overwrite")
    assert res.exit_code == 2
    assert "case 001" in res.stderr and "affine" in res.stderr


def test_non_binary_volume(folders):
    cases, tmp = folders
    prob = cases["004"]["pred"] * 0.8 + 0.1  # a probability map
    write_nifti(tmp / "prob" / "004.nii.gz", prob, _affine(), dtype=np.float32)
    for cid in IDS[:3]:
        write_nifti(tmp / "prob" / f"{cid}.nii.gz", cases[cid]["pred"], _affine())
    args = ["--pred", str(tmp / "prob"), "--truth", str(tmp / "truth"), "--out", str(tmp / "p.csv")]
    res = _run(*args)
    assert res.exit_code == 2
    assert "case 004" in res.stderr and "values other than 0 and 1" in res.stderr
    res = _run(*args, "--threshold", "0.5")
    assert res.exit_code == 0, res.output
    assert float(_read_csv(tmp / "p.csv")[3]["dsc"]) == pytest.approx(case_metrics(cases["004"]["pred"], cases["004"]["truth"], SPACING)["dsc"])


def test_existing_output_refused(folders):
    _, tmp = folders
    assert _run(*_base(tmp)).exit_code == 0
    out = tmp / "res" / "results.csv"
    before = out.read_bytes()
    res = _run(*_base(tmp), "--hd95", "pooled")
    assert res.exit_code == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert out.read_bytes() == before
    # The summary alone also blocks (it would be overwritten too).
    out.unlink()
    assert _run(*_base(tmp)).exit_code == 2
    res = _run(*_base(tmp), "--hd95", "pooled", "--overwrite")
    assert res.exit_code == 0
    assert _read_csv(out)[0]["hd95_definition"] == "pooled"
    assert not [p.name for p in (tmp / "res").iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("option,value", [("--target", "bone"), ("--hd95", "mean")])
def test_bad_choices(folders, option, value):
    _, tmp = folders
    res = _run(*_base(tmp), option, value)
    assert res.exit_code == 2 and option in res.stderr and value in res.stderr


def test_evaluate_arrays_and_summarise_in_memory():
    cases = _cases()
    pred = np.stack([cases[c]["pred"] for c in IDS])
    truth = np.stack([cases[c]["truth"] for c in IDS])
    defective = np.stack([cases[c]["defective"] for c in IDS])
    rows = evaluate_arrays(pred, truth, [SPACING] * 4, defective=defective, hd95="pooled")
    assert "case" not in rows[0] and "target" not in rows[0]  # callers merge their own keys
    for cid, r in zip(IDS, rows):
        assert r == case_metrics(cases[cid]["pred"], cases[cid]["truth"], SPACING, defective=cases[cid]["defective"], hd95="pooled")
    s = summarise(rows, target="skull")
    assert s["n_cases"] == 4 and s["n_failed"] == 1 and s["hd95_definition"] == "pooled"
    assert s["metrics"]["dsc"]["mean"] == pytest.approx(np.mean([r["dsc"] for r in rows]))
    named = evaluate_arrays(pred, truth, SPACING, ids=IDS, target="skull")
    assert [r["case"] for r in named] == list(IDS) and summarise(named)["failed_cases"] == ["003"]
