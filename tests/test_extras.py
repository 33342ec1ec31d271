"""Optional extras: a command whose extra is not installed says so in one line (exit 2) before doing
anything, and the core install's modules import without any extra.

A package counts as not installed when ``sys.modules[name] is None``: that is how Python itself marks
an import that must fail, and ``importlib.util.find_spec`` then answers None, as for a missing package.
The installed-wheel test (tests/test_wheel.py) runs the same commands where the packages are really absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.errors import InputError
from skullrec.extras import EXTRAS, missing_modules, require_extra

REPO = Path(__file__).resolve().parents[1]


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def _never(*args, **kwargs):
    raise AssertionError("the command went on past its extra's check")


def _one_error_line(res, extra: str, missing: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output, res.stderr
    assert f"needs the [{extra}] extra (pip install 'skullrec[{extra}]'); not installed: {missing}" in res.stderr, res.stderr
    assert res.stderr.startswith("error: skullrec ")


def test_missing_modules_names_only_what_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert missing_modules(["json", "numpy", "skullrec_no_such_package"]) == ["skullrec_no_such_package"]
    _hide(monkeypatch, "plotly")
    assert missing_modules(["streamlit", "plotly", "matplotlib"]) == ["plotly"]
    with pytest.raises(InputError, match=r"^skullrec view: needs the \[viewer\] extra .*not installed: plotly$"):
        require_extra("skullrec view", "viewer", ["streamlit", "plotly"])
    require_extra("skullrec view", "viewer", ["streamlit"])  # present: no error


def test_view_without_the_viewer_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide(monkeypatch, "streamlit", "plotly")
    monkeypatch.setattr("skullrec.viewer.launch.launch", _never)  # a missing check must not start a server
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["view", "--port", "8599"])
    _one_error_line(res, "viewer", "streamlit, plotly")
    assert list(tmp_path.iterdir()) == []


def test_federate_without_the_federated_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide(monkeypatch, "flwr")
    monkeypatch.setattr("skullrec.federated.run.federate", _never)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["federate", "--config", str(REPO / "configs" / "federate.yaml"), "--out", str(tmp_path / "fed")])
    _one_error_line(res, "federated", "flwr")
    assert list(tmp_path.iterdir()) == []


def test_experiment_without_matplotlib_stops_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The figures come last; the check must come first, so nothing (no data set, no run) is written.
    _hide(monkeypatch, "matplotlib")
    monkeypatch.setattr("skullrec.data.synth.write_synthetic", _never)
    monkeypatch.setattr("skullrec.experiment.sweep.train_sweep", _never)
    monkeypatch.chdir(REPO)  # the demo config names configs/ and data/ relative to the checkout
    out = tmp_path / "exp"
    res = CliRunner().invoke(app, ["experiment", "--config", "configs/demo.yaml", "--out", str(out), "--device", "cpu",
                                   "--set", f"data_root={tmp_path / 'data'}"])
    _one_error_line(res, "viewer", "matplotlib")
    assert list(tmp_path.iterdir()) == []


def test_sites_needs_no_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `skullrec sites` only splits folders: without flwr it reaches its own input check.
    _hide(monkeypatch, "flwr")
    res = CliRunner().invoke(app, ["sites", "--in", str(tmp_path / "nope"), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "needs the [" not in res.stderr and "not found in data set" in res.stderr, res.stderr


def test_core_modules_import_without_any_extra() -> None:
    # A fresh interpreter where every extra's packages fail to import: the command line and the
    # core stages (data, nets, training, inference, evaluation, experiment's sweep) still load.
    hidden = sorted({m for mods in EXTRAS.values() for m in mods})
    code = (
        "import sys\n"
        f"for m in {hidden!r}: sys.modules[m] = None\n"
        "import skullrec.cli, skullrec.data.build, skullrec.training.trainer, skullrec.training.stage2\n"
        "import skullrec.inference.predict, skullrec.evaluation.evaluate, skullrec.experiment.sweep\n"
        "import skullrec.federated.sites, skullrec.viewer.launch\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in " + repr(hidden) + " and sys.modules[m] is not None))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok []"
