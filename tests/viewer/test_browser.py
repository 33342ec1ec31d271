"""End-to-end: ``skullrec view`` in a real headless chromium (playwright), WebGL through SwiftShader.

The browser code is scripts/screenshot_viewer.py, the same code path that writes docs/viewer.png.
Needs Debian's chromium at /usr/bin/chromium (CI installs it with apt-get) and the playwright
package; the browser is never downloaded.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from skullrec.data.layout import write_case, write_manifest
from skullrec.io import read_volume, write_nifti

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install chromium)"),
]


def load_module(name: str, path: Path):
    """A module from a file (scripts/ is no package; works under any pytest import mode)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def screenshot_module():
    return load_module("screenshot_viewer", REPO / "scripts" / "screenshot_viewer.py")


# The tiny data set and checkpoint of the AppTest tests.
_app_tests = load_module("test_viewer_helpers", Path(__file__).with_name("test_helpers.py"))
small_checkpoint, toy_affine, toy_skull = _app_tests.small_checkpoint, _app_tests.toy_affine, _app_tests.toy_skull


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_viewer_renders_webgl_uploads_and_scores_in_chromium(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("playwright", reason="pip install playwright (dev extra)")
    monkeypatch.setenv("SKULLREC_MODELS", str(tmp_path / "no-shipped-models"))  # the tiny run below is the default
    shot_mod = screenshot_module()

    data = tmp_path / "data"
    complete, defective = toy_skull()
    write_case(data, "eval_set1", "001", complete, defective, toy_affine())
    write_manifest(data, [{"split": "eval_set1", "id": "001"}])
    runs = tmp_path / "runs"
    small_checkpoint(runs / "tiny" / "last.safetensors")
    # The upload: another skull, as separate defective and truth files.
    c2, d2 = toy_skull(shift=1.5)
    upload = write_nifti(tmp_path / "upload" / "patient_defective.nii.gz", d2, toy_affine())
    truth = write_nifti(tmp_path / "upload" / "patient_complete.nii.gz", c2, toy_affine())

    shot = tmp_path / "viewer.png"
    report = shot_mod.run_in_browser(data, runs, shot, upload=upload, truth=truth, timeout_s=240, log=tmp_path / "viewer.log")

    assert report.errors == [], report.errors
    # The 3D view is a WebGL canvas and has drawn the skull (not just the white background).
    assert report.webgl
    assert report.canvas_drawn > 0.02, f"3D view looks empty ({report.canvas_drawn:.4f} of pixels drawn)"
    # After the upload (with its truth) the metrics are shown, with units.
    assert list(report.metrics) == ["DSC (skull)", "HD (skull)", "HD95 (skull)", "DSC (implant)"]
    assert 0.0 <= float(report.metrics["DSC (skull)"]) <= 1.0
    assert report.metrics["HD95 (skull)"].endswith(" mm")
    # The implant download is a NIfTI on the case's own grid (32^3, 1.5 x 1.5 x 2 mm).
    assert [d.name for d in report.downloads] == ["eval_set1_001_implant.nii.gz"]
    implant = read_volume(report.downloads[0])
    assert implant.shape == (32, 32, 32)
    np.testing.assert_allclose(implant.affine, toy_affine())
    for path in report.screenshots:
        w, h = png_size(path)
        assert w == shot_mod.VIEWPORT["width"] and h >= shot_mod.VIEWPORT["height"] // 2
    assert report.screenshots[0] == shot
