"""``skullrec view``: start the Streamlit page with the settings passed through ``SKULLREC_VIEW_*`` variables.

The folders reach the page through environment variables rather than script arguments, so that
``streamlit.testing.v1.AppTest`` (which cannot pass script arguments) configures the page the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import InputError
from .helpers import DEFAULT_MAX_UPLOAD_MB

ENV_DATA = "SKULLREC_VIEW_DATA"
ENV_RUNS = "SKULLREC_VIEW_RUNS"
ENV_RESULTS = "SKULLREC_VIEW_RESULTS"
ENV_MAX_UPLOAD_MB = "SKULLREC_VIEW_MAX_UPLOAD_MB"
# One input given on the command line (``skullrec view --in``): a volume file or a DICOM series folder.
ENV_INPUT = "SKULLREC_VIEW_INPUT"
ENV_CT = "SKULLREC_VIEW_CT"  # bone threshold in HU: the input is a CT (--ct --bone-hu)
ENV_SERIES = "SKULLREC_VIEW_SERIES"  # comma-separated DICOM series UIDs (--series)
DEFAULT_DATA = Path("data/synthetic")
DEFAULT_RUNS = Path("runs")
# `bash scripts/run.sh demo` (skullrec experiment) writes its runs under results/NAME/runs/, so the
# default search covers results/ as well as runs/ (what `skullrec train` uses).
DEFAULT_RUN_ROOTS = (DEFAULT_RUNS, Path("results"))


def page_path() -> Path:
    """Path of the Streamlit page, ``skullrec/viewer/page.py`` (inside the package, so a wheel has it too)."""
    return Path(__file__).resolve().with_name("page.py")


@dataclass
class ViewerSettings:
    """What the page shows: the folders given to ``skullrec view`` and the upload size limit."""

    data: Path = DEFAULT_DATA
    runs: tuple[Path, ...] = DEFAULT_RUN_ROOTS
    results: Path | None = None
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    input: Path | None = None  # a volume file or DICOM series folder to open (--in)
    ct_bone_hu: float | None = None  # set: the input is a CT in HU, bone >= this (--ct, --bone-hu)
    series: tuple[str, ...] = ()  # DICOM series UIDs to choose from (--series)

    def to_env(self) -> dict[str, str]:
        """Environment variables that carry these settings to the page."""
        runs = os.pathsep.join(str(r) for r in self.runs)
        env = {ENV_DATA: str(self.data), ENV_RUNS: runs, ENV_MAX_UPLOAD_MB: str(self.max_upload_mb)}
        if self.results is not None:
            env[ENV_RESULTS] = str(self.results)
        if self.input is not None:
            env[ENV_INPUT] = str(self.input)
        if self.ct_bone_hu is not None:
            env[ENV_CT] = repr(float(self.ct_bone_hu))
        if self.series:
            env[ENV_SERIES] = ",".join(self.series)
        return env


def settings_from_env(environ: Mapping[str, str] | None = None) -> ViewerSettings:
    """Read :class:`ViewerSettings` from ``SKULLREC_VIEW_*`` variables (defaults where unset)."""
    environ = os.environ if environ is None else environ
    raw_mb = environ.get(ENV_MAX_UPLOAD_MB, "")
    try:
        max_mb = int(raw_mb) if raw_mb else DEFAULT_MAX_UPLOAD_MB
    except ValueError:
        raise InputError(f"{ENV_MAX_UPLOAD_MB}: expected a whole number of MB, got {raw_mb!r}") from None
    results = environ.get(ENV_RESULTS) or None
    raw_ct = environ.get(ENV_CT, "")
    try:
        ct_bone_hu = float(raw_ct) if raw_ct else None
    except ValueError:
        raise InputError(f"{ENV_CT}: expected a bone threshold in HU, got {raw_ct!r}") from None
    return ViewerSettings(
        data=Path(environ.get(ENV_DATA) or DEFAULT_DATA),
        runs=tuple(Path(r) for r in environ[ENV_RUNS].split(os.pathsep) if r) if environ.get(ENV_RUNS) else DEFAULT_RUN_ROOTS,
        results=Path(results) if results else None,
        max_upload_mb=max_mb,
        input=Path(environ[ENV_INPUT]) if environ.get(ENV_INPUT) else None,
        ct_bone_hu=ct_bone_hu,
        series=tuple(u for u in environ.get(ENV_SERIES, "").split(",") if u),
    )


def streamlit_command(app: Path, host: str, port: int, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB) -> list[str]:
    """The ``streamlit run`` command line: bound to ``host``, headless, no usage statistics."""
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.maxUploadSize", str(max_upload_mb),
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this is a local tool
    ]


def launch(settings: ViewerSettings, host: str, port: int) -> int:
    """Run ``streamlit run skullrec/viewer/page.py`` with ``settings`` until it exits; returns its exit code.

    The server is a child process: SIGTERM and SIGHUP sent to this launcher are forwarded to it
    (so ``kill`` of ``skullrec view`` never leaves a server running), and Ctrl-C / SIGINT stops it
    too. A stop asked for by such a signal returns 0.
    """
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(streamlit_command(page_path(), host, port, settings.max_upload_mb), env=env)
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread (e.g. called from a test runner's worker): no forwarding
            pass
    try:
        code = proc.wait()
        return 0 if forwarded else code
    except KeyboardInterrupt:
        _stop(proc)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # any other way out of here: never leave the server behind
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server, and kill it if it has not gone after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
