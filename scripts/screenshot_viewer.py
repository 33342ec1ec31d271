"""Drive the skullrec viewer in a real browser (Debian chromium + playwright) and take a screenshot.

One code path for two users: tests/viewer/test_browser.py (end-to-end test, screenshot into the
test's temp folder) and the README screenshot::

    .venv/bin/python scripts/screenshot_viewer.py --data data/synthetic --runs results/demo/runs --out docs/viewer.png

Steps: start ``skullrec view`` on 127.0.0.1 with a free port, wait for ``/_stcore/health``, open the
page in headless chromium (SwiftShader gives WebGL without a GPU), reconstruct the selected case,
check that the 3D view's WebGL canvas has drawn something, optionally upload a defective skull (and
its truth) and wait for the metrics, then save a screenshot. Never downloads a browser: it uses
/usr/bin/chromium (``apt-get install chromium``), not ``playwright install``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Headless chromium without a GPU: SwiftShader (software GL through ANGLE) lets plotly's WebGL draw.
# The rest keeps the browser from phoning home and from reusing any profile.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-quic",
    "--metrics-recording-only",
]
# Tall enough that the case view (3D, slices, metrics, downloads) fits: streamlit scrolls inside
# its own container, so a "full page" screenshot is only the viewport.
VIEWPORT = {"width": 1500, "height": 1350}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_viewer(data: Path, runs: Path, port: int, results: Path | None = None, log: Path | None = None) -> subprocess.Popen:
    """``skullrec view`` as a subprocess in its own process group (so the streamlit child stops too)."""
    cmd = [sys.executable, "-m", "skullrec", "view", "--data", str(data), "--runs", str(runs), "--host", "127.0.0.1", "--port", str(port)]
    if results is not None:
        cmd += ["--results", str(results)]
    # One torch thread: the CI machine is small and shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_viewer(proc: subprocess.Popen) -> None:
    """Stop the viewer started by :func:`start_viewer` (its own process group only)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll ``/_stcore/health`` until streamlit answers ``ok`` (RuntimeError if it dies or times out)."""
    url = f"http://127.0.0.1:{port}/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"skullrec view exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: no answer within {timeout:.0f} s")


def drawn_fraction(png: bytes) -> float:
    """Fraction of pixels in a screenshot that differ from its most common colour (the background)."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(img, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float(np.any(np.abs(img.astype(int) - background) > 12, axis=1).mean())


@dataclass
class Report:
    """What the browser saw."""

    webgl: bool = False  # the 3D chart has a canvas with a WebGL context
    canvas_drawn: float = 0.0  # fraction of the 3D chart's pixels that are not background
    metrics: dict[str, str] = field(default_factory=dict)  # label -> value after the upload
    errors: list[str] = field(default_factory=list)  # st.error / exception texts seen
    screenshots: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step
    downloads: list[Path] = field(default_factory=list)  # files fetched with the download buttons


def _sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def _wait_idle(page, timeout_ms: int) -> None:
    """Wait until streamlit has finished the current script run (its status widget disappears)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=timeout_ms)


def _metrics(page) -> dict[str, str]:
    out = {}
    for m in page.locator('[data-testid="stMetric"]').all():
        label = m.locator('[data-testid="stMetricLabel"]').inner_text().strip()
        out[label] = m.locator('[data-testid="stMetricValue"]').inner_text().strip()
    return out


def _errors(page) -> list[str]:
    texts = [e.inner_text().strip() for e in page.locator('[data-testid="stException"]').all()]
    return texts + [e.inner_text().strip() for e in page.locator('[data-testid="stAlertContentError"]').all()]


def _select(page, label: str, value: str, timeout_ms: int) -> None:
    """Choose ``value`` in the sidebar selectbox labelled ``label`` (a baseweb select: click, then the option)."""
    box = _sidebar(page).locator('[data-testid="stSelectbox"]').filter(has_text=label).first
    box.click()
    page.get_by_role("option", name=value, exact=True).click()
    _wait_idle(page, timeout_ms)


def _check_3d(page, report: Report, timeout_ms: int) -> None:
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    canvas = chart.locator("canvas").first
    canvas.wait_for(state="visible", timeout=timeout_ms)
    report.webgl = bool(canvas.evaluate("c => !!(c.getContext('webgl2') || c.getContext('webgl'))"))
    page.wait_for_timeout(1500)  # let SwiftShader finish the first frame
    report.canvas_drawn = drawn_fraction(chart.screenshot())


def drive_viewer(page, url: str, shot: Path, upload: Path | None = None, truth: Path | None = None, timeout_s: float = 180,
                 split: str | None = None, case: str | None = None) -> Report:
    """Open the viewer, reconstruct the selected case, check the 3D view, upload, screenshot.

    The screenshot (full page) is taken after the data-set case was reconstructed, so it shows the
    3D view, the slices and the metrics; after an upload a second one goes next to it (``*_upload.png``).
    """
    t = int(timeout_s * 1000)
    report = Report()
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.seconds[name] = round(now - clock, 2)
        clock = now

    page.goto(url, wait_until="domcontentloaded")
    button = _sidebar(page).get_by_role("button", name="Reconstruct")
    button.wait_for(state="visible", timeout=t)
    _wait_idle(page, t)
    if split is not None:
        _select(page, "Split", split, t)
    if case is not None:
        _select(page, "Case", case, t)
    lap("page")
    button.click()
    page.locator('[data-testid="stMetric"]').first.wait_for(state="visible", timeout=t)
    _wait_idle(page, t)
    lap("reconstruct")
    _check_3d(page, report, t)
    report.metrics = _metrics(page)
    lap("webgl")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    report.screenshots.append(shot)
    lap("screenshot")
    # A download button hands over the implant on the input's grid (deferred: made on click).
    with page.expect_download(timeout=t) as dl:
        page.get_by_role("button", name="Implant (NII.GZ)").click()
    target = shot.parent / dl.value.suggested_filename
    dl.value.save_as(str(target))
    report.downloads.append(target)
    lap("download")

    if upload is not None:
        _sidebar(page).get_by_text("Upload", exact=True).click()
        inputs = _sidebar(page).locator('input[type="file"]')
        inputs.first.wait_for(state="attached", timeout=t)
        inputs.nth(0).set_input_files(str(upload))
        _wait_idle(page, t)
        if truth is not None:
            inputs.nth(1).set_input_files(str(truth))
            _wait_idle(page, t)
        # Wait until the page shows the upload (its name is the case title) before reconstructing.
        page.get_by_role("heading", name=upload.name).wait_for(state="visible", timeout=t)
        _sidebar(page).get_by_role("button", name="Reconstruct").click()
        page.locator('[data-testid="stMetric"]').first.wait_for(state="visible", timeout=t)
        _wait_idle(page, t)
        report.metrics = _metrics(page)
        lap("upload")
        up_shot = shot.with_name(shot.stem + "_upload.png")
        page.screenshot(path=str(up_shot), full_page=True)
        report.screenshots.append(up_shot)
    report.errors = _errors(page)
    return report


def run_in_browser(data: Path, runs: Path, shot: Path, upload: Path | None = None, truth: Path | None = None,
                   timeout_s: float = 180, log: Path | None = None, split: str | None = None, case: str | None = None) -> Report:
    """Start the viewer, drive it in a fresh headless chromium profile, stop both; returns the report."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    t0 = time.perf_counter()
    proc = start_viewer(data, runs, port, log=log)
    try:
        wait_healthy(port, proc)
        started = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="skullrec-chromium-") as profile, sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            )
            try:
                page = ctx.new_page()
                report = drive_viewer(page, f"http://127.0.0.1:{port}/", shot, upload, truth, timeout_s, split, case)
                report.seconds = {"server": round(started, 2), **report.seconds}
                return report
            finally:
                ctx.close()
    finally:
        stop_viewer(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--runs", type=Path, default=Path("results/demo/runs"))
    ap.add_argument("--out", type=Path, default=Path("docs/viewer.png"))
    ap.add_argument("--upload", type=Path, default=None, help="Also upload this defective skull (and --truth).")
    ap.add_argument("--truth", type=Path, default=None)
    ap.add_argument("--split", default="eval_set1", help="Split of the case to show (default eval_set1).")
    ap.add_argument("--case", default=None, help="Case id to show (default: the split's first).")
    args = ap.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} not found: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "viewer.png"
        rep = run_in_browser(args.data.resolve(), args.runs.resolve(), shot, args.upload, args.truth, split=args.split, case=args.case)
        print(f"webgl={rep.webgl} canvas_drawn={rep.canvas_drawn:.3f} metrics={rep.metrics} errors={rep.errors} seconds={rep.seconds}")
        if not rep.webgl or rep.canvas_drawn < 0.01 or rep.errors:
            print("the 3D view did not render (or the page showed errors); screenshot not written", file=sys.stderr)
            return 1
        from skullrec.io import atomic_write_bytes

        atomic_write_bytes(args.out, shot.read_bytes())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
