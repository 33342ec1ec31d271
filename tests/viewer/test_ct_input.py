"""``skullrec view --in`` with a CT: the settings travel to the page, which shows the skull mask made from the CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from ct_helpers import UID_ROOT, ct_from_skull, defective_shell, write_dicom_series

from skullrec.cli import view_command
from skullrec.data.ct import read_ct_skull
from skullrec.errors import InputError
from skullrec.viewer import helpers as V
from skullrec.viewer import launch as L

APP = REPO / "app" / "viewer.py"


def _shell() -> np.ndarray:
    return defective_shell((30, 28, 24), (13, 12, 10), 0.8, np.s_[10:20, 9:19, 16:])


@pytest.fixture()
def ct_series(tmp_path: Path) -> Path:
    write_dicom_series(tmp_path / "ct", ct_from_skull(_shell(), np.random.default_rng(0)), (2.0, 2.0, 2.5), uid=UID_ROOT + ".7")
    return tmp_path / "ct"


def test_settings_with_a_ct_input_round_trip(tmp_path: Path) -> None:
    s = L.ViewerSettings(data=tmp_path, input=tmp_path / "ct", ct_bone_hu=250.0, series=("1.2.3", "4.5"))
    assert L.settings_from_env(s.to_env()) == s
    with pytest.raises(InputError, match="SKULLREC_VIEW_CT"):
        L.settings_from_env({L.ENV_CT: "bone"})


def test_view_command_passes_the_ct_to_the_page(monkeypatch: pytest.MonkeyPatch, ct_series: Path, tmp_path: Path) -> None:
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env):
            seen["env"] = env

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(L.subprocess, "Popen", FakePopen)
    view_command(data=None, runs=None, results=None, host="127.0.0.1", port=8765, inp=ct_series, ct=True, bone_hu=400.0)
    settings = L.settings_from_env(seen["env"])
    assert settings.input == ct_series.resolve() and settings.ct_bone_hu == 400.0 and settings.series == ()
    with pytest.raises(InputError, match="--bone-hu: only with --ct"):
        view_command(data=None, runs=None, results=None, host="127.0.0.1", port=8765, inp=ct_series, bone_hu=400.0)
    with pytest.raises(InputError, match="--ct: applies to --in"):
        view_command(data=None, runs=None, results=None, host="127.0.0.1", port=8765, ct=True)
    with pytest.raises(InputError, match="neither a volume file"):
        view_command(data=None, runs=None, results=None, host="127.0.0.1", port=8765, inp=tmp_path)
    for p in write_dicom_series(tmp_path / "other", np.zeros((4, 4, 3), np.int16), uid=UID_ROOT + ".8"):
        p.rename(ct_series / f"b_{p.name}")  # a second series in the folder: listed before the browser starts
    with pytest.raises(InputError, match="2 DICOM series in this folder; choose one with --series"):
        view_command(data=None, runs=None, results=None, host="127.0.0.1", port=8765, inp=ct_series, ct=True)
    view_command(data=None, runs=None, results=None, host="127.0.0.1", port=8765, inp=ct_series, ct=True, series=[UID_ROOT + ".7"])
    assert L.settings_from_env(seen["env"]).series == (UID_ROOT + ".7",)


def test_read_input_makes_the_ct_mask(ct_series: Path) -> None:
    vol = V.read_input(ct_series, 300.0)
    np.testing.assert_array_equal(vol.data, read_ct_skull(ct_series)[0].data)
    assert vol.data.sum() == _shell().sum()  # identity direction: canonical already, same voxel count
    with pytest.raises(InputError, match="or --ct for a CT in HU"):
        V.read_input(ct_series)


def test_page_opens_the_ct_given_with_in(monkeypatch: pytest.MonkeyPatch, ct_series: Path, tmp_path: Path) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from skullrec.inference.shipped import MODELS_ENV

    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "no-shipped-models"))
    for key, value in L.ViewerSettings(data=tmp_path / "no-data", runs=(tmp_path / "no-runs",), input=ct_series,
                                       ct_bone_hu=300.0).to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(L.ENV_RESULTS, raising=False)
    monkeypatch.delenv(L.ENV_SERIES, raising=False)
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    try:
        assert not at.exception, [e.value for e in at.exception]
        assert at.sidebar.radio(key="source").value == "File (--in)"
        assert not at.sidebar.error
        charts = [json.loads(el.proto.spec)["data"] for el in at.get("plotly_chart") if el.proto.id and "view3d" in el.proto.id]
        assert [t["name"] for t in charts[0]] == ["Defective skull"]
    finally:
        st.cache_data.clear()
