"""Trustworthy on real inputs (issue 12): no input or result lost, garbage never written as a result,
bounded work from a header, no traceback for user-facing failures."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from skullrec.data.layout import check_output_dir, staged_output
from skullrec.errors import InputError

# ------------------------------------------------------------------------------------------
# no input or result lost
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_folder_overlapping_an_input_is_refused_whatever_the_flags(tmp_path: Path, overwrite: bool) -> None:
    data = tmp_path / "D"
    (data / "complete").mkdir(parents=True)
    (data / "complete" / "a.nii.gz").write_bytes(b"skull")
    for out, how in ((data / "complete", "is the input folder"), (data, "contains the input folder"),
                     (data / "complete" / "sub", "lies inside the input folder")):
        with pytest.raises(InputError, match=how):
            check_output_dir(out, overwrite, inputs=[data / "complete"])
        with pytest.raises(InputError, match=how):
            with staged_output(out, overwrite, inputs=[data / "complete"]):
                pass
    # A symlink to the input is the input.
    (tmp_path / "link").symlink_to(data / "complete")
    with pytest.raises(InputError, match="is the input folder"):
        check_output_dir(tmp_path / "link", overwrite, inputs=[data / "complete"])
    assert (data / "complete" / "a.nii.gz").read_bytes() == b"skull"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "link"]  # nothing written, no lock left
    check_output_dir(tmp_path / "elsewhere", overwrite, inputs=[data / "complete", None])  # apart: fine


def test_a_second_writer_of_one_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "a.txt").write_text("first")
        with pytest.raises(InputError, match="another skullrec command is writing this output folder") as err:
            with staged_output(out):
                pass
        assert "\n" not in str(err.value)
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file is gone with the writer


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from skullrec.data.layout import staged_output
    with staged_output(Path(sys.argv[1])) as staging:
        (staging / "partial.nii.gz").write_bytes(b"half")
        print(staging, flush=True)
        time.sleep(120)
    """
)


def test_lock_dies_with_its_process_and_stale_staging_is_removed_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        staging = Path(proc.stdout.readline().strip())
        assert staging.is_dir() and staging.name.startswith(".out.staging-")
        with pytest.raises(InputError, match="another skullrec command"):  # held by a live process
            with staged_output(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert staging.is_dir()  # kill -9 left its partial output behind
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        with staged_output(out) as new:
            (new / "done.txt").write_text("ok")
    assert not staging.exists()
    assert any(str(staging) in r.getMessage() and "did not finish" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "done.txt").read_text() == "ok"


def test_outputs_get_the_users_umask(tmp_path: Path) -> None:
    from skullrec.io import write_nifti

    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out") as staging:
            write_nifti(staging / "complete" / "a.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755
    assert mode(tmp_path / "out" / "complete") == 0o755
    assert mode(tmp_path / "out" / "complete" / "a.nii.gz") == 0o644
