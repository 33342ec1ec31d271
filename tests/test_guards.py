"""Output-path guards: inputs reached through symlinks are protected, a symlinked --out keeps its link,
evaluate's CSV + summary JSON are replaced as a pair, write failures past ``ulimit -f`` name the file, and
torn temporary files in a run folder are removed on the next run."""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from skullrec.data.layout import staged_output
from skullrec.errors import InputError
from skullrec.guards import check_outside_inputs


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------


def test_symlinked_members_of_input_folders_are_inputs_at_their_target(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.nii.gz").write_bytes(b"the only copy")
    inp = tmp_path / "in" / "sub"
    inp.mkdir(parents=True)
    (inp / "a.nii.gz").symlink_to(elsewhere / "real.nii.gz")
    # a folder output holding the target, or the target as a file output: refused with where it came from
    with pytest.raises(InputError, match=r"output folder contains the input file .*real\.nii\.gz \(linked from .*sub/a\.nii\.gz\)"):
        check_outside_inputs(elsewhere, [tmp_path / "in"])
    with pytest.raises(InputError, match=r"output file is the input file .*real\.nii\.gz \(linked from"):
        check_outside_inputs(elsewhere / "real.nii.gz", [tmp_path / "in"], folder=False)
    # a file output beside the target is apart (a file cannot hold anything); a folder beside it too
    check_outside_inputs(elsewhere / "results.csv", [tmp_path / "in"], folder=False)
    check_outside_inputs(tmp_path / "out", [tmp_path / "in"])
    # a linked sub-folder protects its target; a symlink loop protects nothing and does not hang
    (tmp_path / "in" / "more").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "in" / "loop_a").symlink_to(tmp_path / "in" / "loop_b")
    (tmp_path / "in" / "loop_b").symlink_to(tmp_path / "in" / "loop_a")
    with pytest.raises(InputError, match=r"lies inside the input folder .*elsewhere \(linked from .*in/more\)"):
        check_outside_inputs(elsewhere / "out", [tmp_path / "in"])
    assert (elsewhere / "real.nii.gz").read_bytes() == b"the only copy"


def test_an_output_file_may_not_be_an_input_or_lie_inside_one(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "001.nii.gz").write_bytes(b"ground truth")
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"weights")
    for out, how in ((truth / "001.nii.gz", "lies inside the input folder"), (truth, "is the input folder"),
                     (ckpt, "is the input file"), (truth / "new" / "r.csv", "lies inside the input folder")):
        with pytest.raises(InputError, match=how) as err:
            check_outside_inputs(out, [None, truth, ckpt], folder=False)
        assert str(err.value).startswith(f"{out}: output file ") and "\n" not in str(err.value)
    check_outside_inputs(tmp_path / "r.csv", [truth, ckpt], folder=False)  # beside them: fine
    with pytest.raises(InputError, match="contains the input file"):  # a folder output above a checkpoint
        check_outside_inputs(tmp_path, [ckpt])


# ------------------------------------------------------------------------------------------
# a symlinked --out
# ------------------------------------------------------------------------------------------


def test_a_symlinked_out_keeps_its_link_and_its_target_gets_the_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "disk" / "results"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("earlier results")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    for n in (1, 2):  # twice: the second run sees whatever the first left
        with caplog.at_level(logging.WARNING, logger="skullrec"):
            with staged_output(link, overwrite=True) as staging:
                assert staging.parent == target.parent  # staged beside the target: one rename on its file system
                (staging / "new.txt").write_text(f"run {n}")
        assert link.is_symlink() and link.resolve() == target
        assert _entries(target) == ["new.txt"] and (link / "new.txt").read_text() == f"run {n}"
        assert _entries(tmp_path) == ["disk", "out"]  # no .out.old-* / .out.lock beside the link
        assert _entries(tmp_path / "disk") == ["results"]  # nor staging / old / lock beside the target
        assert caplog.records == []  # no warning about a removed partial output that never was
    # a dangling link: the results are written where it points, the link kept
    link2 = tmp_path / "out2"
    link2.symlink_to(tmp_path / "disk" / "later", target_is_directory=True)
    with staged_output(link2) as staging:
        (staging / "a.txt").write_text("a")
    assert link2.is_symlink() and (tmp_path / "disk" / "later" / "a.txt").read_text() == "a"


def test_a_leftover_old_link_is_removed_once_and_its_target_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # what an older skullrec left beside a symlinked --out: the renamed link, never removed
    target = tmp_path / "disk"
    target.mkdir()
    (target / "keep.txt").write_text("data")
    (tmp_path / ".out.old-abc123").symlink_to(target, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        with staged_output(tmp_path / "out") as staging:
            (staging / "a.txt").write_text("a")
    assert _entries(tmp_path) == ["disk", "out"]
    assert (target / "keep.txt").read_text() == "data"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "removed a leftover link" in messages[0] and "untouched" in messages[0], messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        with staged_output(tmp_path / "out", overwrite=True):
            pass
    assert caplog.records == []  # reported once, then gone


# ------------------------------------------------------------------------------------------
# evaluate's CSV + summary JSON: one set
# ------------------------------------------------------------------------------------------


def _volumes(folder: Path, n: int) -> Path:
    from skullrec.io import write_nifti

    g = np.indices((12, 12, 12)).sum(0)
    for i in range(n):
        write_nifti(folder / f"{i:03d}.nii.gz", ((g + i) % 5 < 2).astype(np.uint8), np.eye(4))
    return folder


# One child process (importing the scorer costs seconds): evaluate with the soft file-size limit of each
# step (bytes; None lifts it), one JSON line per run. The limit must bind a real process: pytest's cannot.
_EVALUATE_UNDER_LIMITS = """
import json, os, resource, sys
from typer.testing import CliRunner
from skullrec.cli import app

pred, probe, out, limits = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
args = ["evaluate", "--pred", pred, "--truth", pred, "--overwrite", "--out"]
CliRunner().invoke(app, args + [probe])
sizes = {}
for name in ("r.csv", "r.summary.json"):
    with open(probe.rsplit("/", 1)[0] + "/" + name, "rb") as f:
        sizes[name] = len(f.read())
print(json.dumps(sizes), flush=True)
for step in limits:
    limit = resource.RLIM_INFINITY if step is None else sizes["r.csv"] + step if step >= 0 else sizes["r.csv"] // 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    res = CliRunner().invoke(app, args + [out])
    folder = os.path.dirname(out)
    files = {n: open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder))}
    print(json.dumps({"code": res.exit_code, "stderr": res.stderr, "files": files}), flush=True)
"""


@pytest.mark.slow  # a child process importing the scorer: ~5 s on an idle machine, more on a busy one
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file-size limit on this platform")
def test_evaluate_past_the_file_size_limit_keeps_the_old_pair_and_names_the_file(tmp_path: Path) -> None:
    pred = _volumes(tmp_path / "pred", 3)
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    old = {"r.csv": "case,target\nold,skull\n", "r.summary.json": json.dumps({"n_cases": 1}) + "\n"}
    for name, text in old.items():
        (res_dir / name).write_text(text)
    (tmp_path / "probe").mkdir()
    # steps: the CSV fits but the summary does not (the torn state the pair must never be left in),
    # then not even the CSV fits, then no limit
    steps = [64, -1, None]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _EVALUATE_UNDER_LIMITS, str(pred), str(tmp_path / "probe" / "r.csv"),
                            str(res_dir / "r.csv"), json.dumps(steps)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert child.returncode == 0, child.stderr
    sizes, *runs = (json.loads(line) for line in child.stdout.splitlines())
    assert sizes["r.csv"] + 64 < sizes["r.summary.json"]  # so the first limit splits the pair
    for run, failing in zip(runs[:2], ("r.summary.json", "r.csv")):
        # one line naming the file that did not fit; the old pair as it was, and no temporary file beside it
        assert run == {"code": 2, "stderr": f"error: {res_dir / failing}: File too large\n", "files": old}, run
    assert runs[2]["code"] == 0, runs[2]  # no limit: both replaced
    assert sorted(runs[2]["files"]) == ["r.csv", "r.summary.json"]
    assert json.loads(runs[2]["files"]["r.summary.json"])["n_cases"] == 3
    assert runs[2]["files"]["r.csv"] == (tmp_path / "probe" / "r.csv").read_text()


def test_evaluate_into_a_symlinked_csv_writes_its_target(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from skullrec.cli import app

    pred = _volumes(tmp_path / "pred", 2)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "r.csv").write_text("old")
    (tmp_path / "r.csv").symlink_to(tmp_path / "store" / "r.csv")
    res = CliRunner().invoke(app, ["evaluate", "--pred", str(pred), "--truth", str(pred), "--out", str(tmp_path / "r.csv"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.csv").is_symlink() and (tmp_path / "store" / "r.csv").read_text().startswith("case,target,")
    assert (tmp_path / "r.summary.json").is_file()


def test_a_write_past_the_file_size_limit_names_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    code = ("import sys, resource; from skullrec.io import atomic_write_bytes; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); atomic_write_bytes(sys.argv[1], b'x' * 5000)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.pt")], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 1 and f"OSError: [Errno 27] File too large: '{tmp_path / 'state.pt'}'" in res.stderr, res.stderr
    assert _entries(tmp_path) == []


# ------------------------------------------------------------------------------------------
# torn temporary files in a run folder
# ------------------------------------------------------------------------------------------


def test_torn_temporaries_in_a_run_folder_are_removed_on_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from skullrec.config import config_from_dict, dump_config
    from skullrec.training.run_dir import CONFIG_FILE, LOCK_FILE, check_new_run_dir, lock_run_dir, settle_run_dir

    cfg = config_from_dict({"model": {"size": 32, "channels": [2, 2, 2, 2, 2]}})
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(dump_config(cfg))
    (run / "notes.txt").write_text("the user's")  # a file of the run that is not a torn temporary (a real state.pt is read by resume)
    torn = [".state.pt.k2j3h4.pt", ".metrics.jsonl.a1b2.jsonl", ".last.safetensors.zz.safetensors", ".x.tmp"]
    for name in torn:
        (run / name).write_bytes(b"half")
    lock = lock_run_dir(run)
    try:
        with caplog.at_level(logging.WARNING, logger="skullrec"):
            settle_run_dir(cfg, run, resume=True, force=False, overwrite=False)
    finally:
        lock.close()
    assert _entries(run) == sorted([LOCK_FILE, CONFIG_FILE, "notes.txt"])
    assert (run / "notes.txt").read_text() == "the user's"
    warned = sorted(r.getMessage() for r in caplog.records)
    assert warned == sorted(f"warning: {run / n}: removed a partly written file of an earlier run that was interrupted" for n in torn)
    # a folder holding only torn temporaries is a new run folder, not one "already holding results"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".config.yaml.q1.yaml").write_bytes(b"half")
    assert check_new_run_dir(fresh, overwrite=False) is False
    (fresh / "best.safetensors").write_bytes(b"a result")
    with pytest.raises(InputError, match="already holds results"):
        check_new_run_dir(fresh, overwrite=False)


def test_a_set_whose_last_rename_fails_is_put_back_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skullrec import io as sio

    a, b, c = tmp_path / "r.csv", tmp_path / "r.summary.json", tmp_path / "new.txt"
    a.write_text("old csv")
    b.write_text("old json")
    real_replace, calls = os.replace, []

    def last_fails(src, dst):  # the rename of the last file fails, after the first two are in place
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(sio.os, "replace", last_fails)
    with pytest.raises(OSError, match="Input/output error"):
        sio.atomic_write_files({c: b"new", a: b"new csv", b: b"new json"})
    monkeypatch.setattr(sio.os, "replace", real_replace)
    # the first (new, no old one) is gone again, the second has its old bytes back (from its hard link),
    # the third never changed; no temporary or backup is left
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"r.csv": "old csv", "r.summary.json": "old json"}
    sio.atomic_write_files({a: b"new csv", b: b"new json"})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"r.csv": "new csv", "r.summary.json": "new json"}


def test_a_failed_nrrd_or_nifti_write_names_the_file_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK as sitk

    from skullrec.io import write_nifti, write_nrrd

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("ITK ERROR: ImageFileWriter: could not write: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", refuse)
    data = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(OSError) as err:
        write_nrrd(tmp_path / "out.nrrd", data, np.eye(4))
    assert err.value.filename == str(tmp_path / "out.nrrd") and "No space left" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores permissions: nothing to check there
            return
        with pytest.raises(OSError) as err:
            write_nifti(tmp_path / "ro" / "x.nii.gz", data, np.eye(4))
        assert err.value.filename == str(tmp_path / "ro" / "x.nii.gz")
    finally:
        (tmp_path / "ro").chmod(0o700)
