"""The non-IID split maker and the site checks (skullrec.federated.sites, `skullrec sites`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO
from skullrec.cli import app
from skullrec.data.layout import load_split, read_manifest, write_case
from skullrec.federated.sites import SITE_EVAL, check_site, site_plan

REAL = REPO / "data" / "real-skullfix"  # five real SkullFix skulls at 64^3, shipped with the repository


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def test_plan_counts_follow_the_weights_and_keep_two_per_site():
    assert site_plan(12, 3, None, None) == ([2, 4, 6], [0.0, 0.5, 1.0])  # default weights 1:2:3, set-2 share 0..1
    counts, _ = site_plan(5, 2, [1, 2], [0.2, 0.9])
    assert counts == [2, 3] and sum(counts) == 5
    assert site_plan(6, 3, [1, 1, 10], None)[0] == [2, 2, 2]  # the minimum of 2 wins over tiny weights


def test_sites_differ_in_size_and_defect_mix_and_are_reproducible(tmp_path: Path):
    out = tmp_path / "sites"
    code, text = _cli("sites", "--in", str(REAL), "--split", "eval_set1", "--out", str(out), "--n-sites", "2",
                      "--set2-fraction", "0", "--set2-fraction", "1", "--seed", "3")
    assert code == 0, text
    assert "site1: 1 training + 1 held-out skulls, 0 with set-2 defects" in text
    assert "site2: 2 training + 1 held-out skulls, 3 with set-2 defects" in text
    source = load_split(REAL, "eval_set1")
    seen = []
    for name, defect_set in (("site1", 1), ("site2", 2)):
        m = read_manifest(out / name)
        assert m["meta"]["set2_fraction"] == float(defect_set - 1)
        assert {c["defect"]["set"] for c in m["cases"]} == {defect_set}
        assert check_site(out / name, 64)["evals"] == [SITE_EVAL]
        for split in ("train", SITE_EVAL):
            s = load_split(out / name, split)
            for i, cid in enumerate(s.ids):
                # The complete skull is the source's, unchanged; the defect removes bone and adds none.
                np.testing.assert_array_equal(s.complete[i], source.complete[source.ids.index(cid)])
                assert not (s.defective[i] & ~s.complete[i]).any()
                removed = 1 - s.defective[i].sum() / s.complete[i].sum()
                assert 0.01 < removed < 0.5
                seen.append(cid)
    assert sorted(seen) == sorted(source.ids)  # every skull at exactly one site
    again = tmp_path / "again"
    assert _cli("sites", "--in", str(REAL), "--split", "eval_set1", "--out", str(again), "--n-sites", "2",
                "--set2-fraction", "0", "--set2-fraction", "1", "--seed", "3")[0] == 0
    for f in sorted(out.rglob("*.nii.gz")):
        assert f.read_bytes() == (again / f.relative_to(out)).read_bytes()
    other = tmp_path / "other"
    assert _cli("sites", "--in", str(REAL), "--split", "eval_set1", "--out", str(other), "--n-sites", "2", "--seed", "4")[0] == 0
    a = json.loads((out / "site2" / "manifest.json").read_text())["cases"]
    b = json.loads((other / "site2" / "manifest.json").read_text())["cases"]
    assert [c["id"] for c in a] != [c["id"] for c in b] or [c["defect"] for c in a] != [c["defect"] for c in b]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--n-sites", "1"], "--n-sites: must be >= 2, got 1"),
        (["--n-sites", "3"], "5 skulls are too few for 3 sites"),
        (["--n-sites", "2", "--weight", "1"], "give one value per site (2), got 1 / 2"),
        (["--n-sites", "2", "--set2-fraction", "0", "--set2-fraction", "1.5"], "--set2-fraction: must lie in [0, 1]"),
    ],
)
def test_sites_bad_arguments_one_line(tmp_path: Path, args: list[str], message: str):
    code, text = _cli("sites", "--in", str(REAL), "--split", "eval_set1", "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in text and text.count("\n") == 1, text
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_check_site_names_the_problem(tmp_path: Path):
    from skullrec.io import InputError

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="site folder does not exist"):
        check_site(tmp_path / "nope")
    with pytest.raises(InputError, match="site is not a folder"):
        check_site(tmp_path / "file")
    with pytest.raises(InputError, match=r"no train/ split; splits found: none"):
        check_site(tmp_path / "empty")
    vol = np.zeros((8, 8, 8), bool)
    vol[2:6, 2:6, 2:6] = True
    write_case(tmp_path / "small", "train", "000", vol, vol, np.eye(4))
    with pytest.raises(InputError, match=r"volumes are \(8, 8, 8\), the model expects 16\^3"):
        check_site(tmp_path / "small", 16)
