"""Packaging: the wheel carries the shipped weights and predicts on its own; the root files agree with pyproject.

The slow test builds the wheel from a copy of the package sources, installs it into a fresh virtualenv
and runs ``skullrec predict`` there with the shipped weights, from a folder outside the checkout and
without PYTHONPATH, so only the installed wheel can answer. The new virtualenv reuses the packages
already installed for the tests (torch, monai, ...) through a folder of links to them, which leaves
out skullrec itself and the packages of the optional extras: the run works offline in seconds and
sees what a core install (``pip install skullrec``) has.
"""

from __future__ import annotations

import email
import fnmatch
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from skullrec.extras import EXTRAS
from skullrec.io import read_volume

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# A real SkullFix skull at 64^3 shipped in the repository (data/real-skullfix/LICENSE.md): case 002 is one
# of the 20 held-out skulls of the shipped weights (neither stage trained on it), with a set-1 defect.
CASE_DIR = REPO / "data" / "real-skullfix" / "eval_set1"
CASE = "002"
DSC_FLOOR = 0.85  # measured 0.920 with the shipped weights (2,402 predicted vs 2,422 true implant voxels) minus a margin
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
# Import names of the optional extras: none may reach the core install.
EXTRA_MODULES = sorted({m for mods in EXTRAS.values() for m in mods})
# Top-level entries of site-packages that belong to skullrec or to the extras' packages.
LEFT_OUT = ("skullrec", "__editable__", "streamlit", "plotly", "_plotly", "matplotlib", "mpl_toolkits", "pylab", "flwr")


# ----------------------------------------------------------------------------------------------
# fast checks of the metadata and root files


def test_license_is_the_apache_text_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert hashlib.sha256((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256
    for name in PYPROJECT["project"]["license-files"]:
        assert (REPO / name).is_file(), name
    assert "CC BY-NC-SA 4.0" in (REPO / "skullrec" / "weights" / "LICENSE.md").read_text()


def test_citation_matches_pyproject() -> None:
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert (cff["title"], cff["version"], cff["license"]) == ("skullrec", PYPROJECT["project"]["version"], "Apache-2.0")
    assert cff["authors"] == [{"name": "skullrec developers"}]
    titles = [r["title"] for r in cff["references"]]
    assert "FAM: Relative Flatness Aware Minimization" in titles
    assert any(t.startswith("SkullBreak / SkullFix") for t in titles)
    assert any(t.startswith("AutoImplant 2020") for t in titles)
    for ref in cff["references"]:  # what CFF 1.2.0 requires of every reference
        assert ref["type"] and ref["title"] and ref["authors"], ref


def test_core_dependencies_leave_the_extras_out() -> None:
    project = PYPROJECT["project"]
    names = lambda reqs: {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in reqs}  # noqa: E731
    core = names(project["dependencies"])
    assert {"torch", "monai", "nibabel", "simpleitk", "safetensors", "typer", "trimesh"} <= core
    assert core.isdisjoint({"streamlit", "plotly", "matplotlib", "flwr"})
    extras = project["optional-dependencies"]
    assert names(extras["viewer"]) == {"streamlit", "plotly", "matplotlib"}
    assert names(extras["federated"]) == {"flwr"}
    assert names(extras["bundle"]) == {"fire"}
    assert "skullrec[viewer,federated,bundle]" in extras["dev"] and {"pytest", "playwright", "ruff", "build"} <= names(extras["dev"])


def test_every_shipped_weights_file_is_package_data() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["skullrec"]
    files = sorted(p.relative_to(REPO / "skullrec").as_posix() for p in (REPO / "skullrec" / "weights").iterdir())
    assert {"weights/stage1.safetensors", "weights/stage2.safetensors", "weights/LICENSE.md"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


# ----------------------------------------------------------------------------------------------
# the wheel, installed and used


def _link_installed_packages(dest: Path) -> Path:
    """A folder of links to this interpreter's installed packages, without skullrec and the extras.

    Every site-packages folder counts (a virtualenv made with --system-site-packages has torch in the
    base one); the first of a name wins, as on sys.path. ``.pth`` files are left out: the folder is put
    on the new virtualenv's path by a ``.pth`` line, so none of its own ``.pth`` files would run anyway
    (in particular no editable-install hook can bring the checkout back).
    """
    dest.mkdir()
    roots = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            name = entry.name.lower()
            if name.startswith(LEFT_OUT) or name.endswith(".pth") or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_installed_wheel_predicts_with_its_shipped_weights(tmp_path: Path) -> None:
    # 1. Build the wheel from a copy of what it is made of, so the build writes nothing into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "skullrec", src / "skullrec", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "--disable-pip-version-check", "-w", dist, src], cwd=tmp_path, env=dict(os.environ), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = dist.glob("skullrec-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    for f in ("stage1.safetensors", "stage2.safetensors", "LICENSE.md", "README.md"):
        assert f"skullrec/weights/{f}" in names
    assert "skullrec/federated/app/pyproject.toml" in names and "skullrec/viewer/page.py" in names
    assert meta["License-Expression"] == "Apache-2.0"
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [r for r in core if r.split(">")[0].split("=")[0].strip().lower() in ("streamlit", "plotly", "matplotlib", "flwr")]

    # 2. A fresh virtualenv on the base interpreter that sees the installed packages but not skullrec or the extras.
    venv = tmp_path / "venv"
    res = _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    vpy = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "SKULLREC_MODELS")}
    env["PYTHONNOUSERSITE"] = "1"
    purelib = Path(_run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path, env=env).stdout.strip())
    (purelib / "_skullrec_test_inherited.pth").write_text(str(_link_installed_packages(tmp_path / "inherited")) + "\n")
    res = _run([vpy, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", wheel], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout + res.stderr

    # 3. From a folder outside the checkout, without PYTHONPATH: skullrec is the installed wheel, the extras are absent.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import importlib.util, json, skullrec; from skullrec.inference.shipped import models_dir; "
             f"print(json.dumps([skullrec.__file__, str(models_dir()), [m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)]]))")
    res = _run([vpy, "-c", probe], cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr
    module_file, weights_dir, extras_found = json.loads(res.stdout)
    assert Path(module_file).resolve().is_relative_to(purelib.resolve()), module_file
    assert Path(weights_dir).resolve() == (purelib / "skullrec" / "weights").resolve()
    assert extras_found == []

    (elsewhere / "in").mkdir()
    shutil.copy2(CASE_DIR / "defective" / f"{CASE}.nii.gz", elsewhere / "in" / f"{CASE}.nii.gz")
    res = _run([venv / "bin" / "skullrec", "predict", "--in", "in", "--out", "out", "--device", "cpu"], cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((elsewhere / "out" / "predict.json").read_text())
    assert Path(report["checkpoint"]).resolve() == (purelib / "skullrec" / "weights" / "stage1.safetensors").resolve()
    assert Path(report["stage2"]).resolve() == (purelib / "skullrec" / "weights" / "stage2.safetensors").resolve()
    implant = read_volume(elsewhere / "out" / "implant" / f"{CASE}.nii.gz").data.astype(bool)
    complete = read_volume(elsewhere / "out" / "complete" / f"{CASE}.nii.gz").data.astype(bool)
    defective = read_volume(CASE_DIR / "defective" / f"{CASE}.nii.gz").data.astype(bool)
    truth = read_volume(CASE_DIR / "implant" / f"{CASE}.nii.gz").data.astype(bool)
    assert report["cases"][0]["implant_voxels"] == int(implant.sum()) > 0
    assert not (implant & defective).any() and (complete >= (implant | defective)).all()
    dsc = 2 * np.count_nonzero(implant & truth) / (np.count_nonzero(implant) + np.count_nonzero(truth))
    assert dsc > DSC_FLOOR, dsc

    # 4. The commands of the extras answer with one line in the core install.
    for args, extra in ((["view"], "viewer"), (["federate"], "federated")):
        res = _run([venv / "bin" / "skullrec", *args], cwd=elsewhere, env=env, timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"needs the [{extra}] extra (pip install 'skullrec[{extra}]')" in res.stderr, res.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["in", "out"]  # nothing else written where it ran
