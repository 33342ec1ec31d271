"""`skullrec federate` on Flower's deployment engine over 127.0.0.1: FedAvg against a hand average, a site
killed mid-round, resume, and one-line errors for bad site folders.

The sites are tiny data sets written here (hollow spheres with a cap cut away, 16^3), the model the
3-stage 16^3 one of the trainer tests, one CPU thread. Flower's SuperNodes poll the SuperLink every 3 s,
so one federated round costs ~15 s of waiting whatever the model; the test keeps to 3 rounds in all.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

pytest.importorskip("flwr")

from conftest import REPO, shell_pair  # noqa: E402
from skullrec.cli import app  # noqa: E402
from skullrec.data.cache import load_training_data  # noqa: E402
from skullrec.data.layout import write_case  # noqa: E402
from skullrec.federated.client_app import local_train, site_config  # noqa: E402
from skullrec.federated.run import FederationFailed, load_federation_config, run_federation, setup_federation  # noqa: E402
from skullrec.federated.server_app import read_metrics, read_state  # noqa: E402
from skullrec.nets.autoencoder import build_model  # noqa: E402
from skullrec.nets.checkpoint import load_checkpoint  # noqa: E402

TRAIN_SET = [
    "model.size=16", "model.channels=[8, 16, 8]", "model.strides=[2, 2, 2]", "train.method=sam", "fam.lam=0.0",
    "train.num_threads=1", "data.max_train_cases=null", "data.max_eval_cases=null", "train.batch_size=2",
]
SITES = {"alpha": 3, "beta": 5}  # training cases per site: FedAvg weights 3/8 and 5/8


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sites")
    rng = np.random.default_rng(0)
    for name, n in SITES.items():
        for i in range(n):
            complete, defective = shell_pair(16, rng)
            write_case(root / name, "train", f"{i:03d}", complete, defective, np.diag([1.5, 1.5, 1.5, 1.0]))
    return {name: root / name for name in SITES}


def _fed_args(sites: dict[str, Path]) -> list[str]:
    return [a for s in sites.values() for a in ("--site", str(s))]


def _local_round(cfg, weights: dict[str, torch.Tensor], sites: dict[str, Path], round_: int) -> dict[str, dict[str, torch.Tensor]]:
    """What each site computes in one round (the ClientApp's own function, run here in the test process)."""
    out = {}
    for name, root in sites.items():
        c = site_config(cfg, str(root))
        model = build_model(c.model, seed=c.seed)
        model.load_state_dict(weights)
        local_train(c, model, load_training_data(c.data, c.model.size, "cpu"), round_=round_, local_epochs=1, site=name)
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def _weighted_mean(local: dict[str, dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """FedAvg by hand, in float64: sum_k n_k w_k / sum_k n_k with n_k the sites' training-case counts."""
    total = sum(SITES.values())
    keys = next(iter(local.values())).keys()
    return {k: sum(SITES[s] * local[s][k].double().numpy() for s in local) / total for k in keys}


def _assert_weights(path: Path, expected: dict[str, np.ndarray]) -> None:
    got = load_file(str(path))
    assert got.keys() == expected.keys()
    for k in got:
        np.testing.assert_allclose(got[k].double().numpy(), expected[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _kill_on_message(lf, site: str, nth: int) -> None:
    """SIGKILL a site's SuperNode (and its ClientApp) once it starts receiving its ``nth`` train message."""
    log = lf.out / "logs" / f"site-{site}.log"

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.is_file() else ""
            if text.count("Receiving: train message") >= nth:
                lf.kill(f"site-{site}")
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.slow
def test_fedavg_equals_weighted_mean_survives_a_dead_site_and_resumes(sites: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fed"
    fed = load_federation_config(None, ["rounds=2", "round_timeout=120", "evaluate=false", "checkpoint_rounds=[1]",
                                        f"train_config={REPO / 'configs' / 'smoke.yaml'}"], list(sites.values()))
    fed.train_set = TRAIN_SET
    cfg, stored = setup_federation(fed, out)

    # Round 1 completes; site beta is killed when round 2 reaches it: that round must not commit.
    with pytest.raises(FederationFailed, match=r"round 2 failed \(no reply from: beta\); the global model stays at round 1"):
        run_federation(out, stored, on_start=lambda lf: _kill_on_message(lf, "beta", 2), echo=lambda s: None)
    assert read_state(out)["round"] == 1
    records = read_metrics(out)
    assert [(r["round"], r["status"]) for r in records] == [(1, "ok"), (2, "failed")]
    assert records[1]["missing"] == ["beta"] and records[1]["reason"] == "SuperNode exited"
    assert {s: records[0]["sites"][s]["num-examples"] for s in SITES} == SITES

    # The committed global model is FedAvg of round 1, computed here from the sites' own local updates.
    w0 = build_model(cfg.model, seed=cfg.seed).state_dict()
    local1 = _local_round(cfg, w0, sites, 1)
    assert not torch.equal(local1["alpha"]["decodeL.weight"], local1["beta"]["decodeL.weight"])
    w1 = _weighted_mean(local1)
    _assert_weights(out / "last.safetensors", w1)  # the dead site's half round left it untouched
    _assert_weights(out / "round_001.safetensors", w1)
    assert load_checkpoint(out / "last.safetensors")[2]["round"] == 1  # a valid, checksummed checkpoint

    # Resume redoes round 2 with both sites.
    code = CliRunner().invoke(app, ["federate", "--resume", str(out), "--set", "round_timeout=120"])
    assert code.exit_code == 0, code.output
    assert read_state(out)["round"] == 2
    assert [(r["round"], r["status"]) for r in read_metrics(out)] == [(1, "ok"), (2, "failed"), (2, "ok")]
    w1_t = {k: torch.from_numpy(v).float() for k, v in w1.items()}
    w2 = _weighted_mean(_local_round(cfg, {k: load_file(str(out / 'round_001.safetensors'))[k] for k in w1_t}, sites, 2))
    _assert_weights(out / "last.safetensors", w2)
    _assert_weights(out / "final.safetensors", w2)  # fedavg: the result is the last global model


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def test_bad_site_folders_get_one_line_errors(sites: dict[str, Path], tmp_path: Path) -> None:
    base = ["federate", "--train-set", "model.size=16", "--train-set", "model.channels=[8, 16, 8]",
            "--train-set", "model.strides=[2, 2, 2]", "--set", f"train_config={REPO / 'configs' / 'baseline.yaml'}"]
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "nodata").mkdir()
    (tmp_path / "unpaired" / "train" / "defective").mkdir(parents=True)
    (tmp_path / "unpaired" / "train" / "complete").mkdir(parents=True)
    src = sites["alpha"] / "train" / "defective" / "000.nii.gz"
    (tmp_path / "unpaired" / "train" / "defective" / "000.nii.gz").write_bytes(src.read_bytes())
    (tmp_path / "unpaired" / "train" / "complete" / "001.nii.gz").write_bytes(src.read_bytes())
    big = tmp_path / "big"
    vol = np.zeros((32, 32, 32), bool)
    vol[8:24, 8:24, 8:24] = True
    write_case(big, "train", "000", vol, vol, np.eye(4))
    twin = tmp_path / "x" / "alpha"
    twin.parent.mkdir()
    twin.symlink_to(sites["alpha"], target_is_directory=True)
    cases = [
        ([tmp_path / "missing"], "site folder does not exist"),
        ([tmp_path / "plain.txt"], "site is not a folder"),
        ([tmp_path / "nodata"], "not a site data set (no train/ split; splits found: none)"),
        ([tmp_path / "unpaired"], "case '000' lacks its complete or defective partner"),
        ([big], "volumes are (32, 32, 32), the model expects 16^3"),
        ([twin], "two sites named 'alpha'"),
    ]
    for extra, message in cases:
        out = tmp_path / f"out_{len(message)}"
        code, text = _cli(*base, "--site", str(sites["alpha"]), *[a for e in extra for a in ("--site", str(e))], "--out", str(out))
        assert code == 2 and message in text and text.count("\n") == 1 and text.startswith("error: "), text
        assert not out.exists()  # refused before anything was written
    # an output inside a site's data is refused whatever the flags, and the site is left as it was
    before = sorted(p.relative_to(sites["beta"]) for p in sites["beta"].rglob("*"))
    code, text = _cli(*base, "--site", str(sites["alpha"]), "--site", str(sites["beta"]),
                      "--out", str(sites["beta"] / "train"), "--overwrite")
    assert code == 2 and "choose an output folder outside the inputs" in text and text.count("\n") == 1, text
    assert sorted(p.relative_to(sites["beta"]) for p in sites["beta"].rglob("*")) == before
    code, text = _cli(*base, "--site", str(sites["alpha"]), "--out", str(tmp_path / "one"))
    assert code == 2 and "need at least 2 site folders" in text and text.count("\n") == 1, text
    code, text = _cli("federate", "--resume", str(tmp_path / "nodata"))
    assert code == 2 and "not a federation folder (no federate.yaml)" in text, text


def test_server_side_swa_is_the_running_mean_of_the_global_models_across_a_resume(tmp_path: Path) -> None:
    """fedavg-swa from round 2 of 4: SWA = mean of the global models of rounds 2, 3, 4, also when the server
    restarts after round 2 (the SWA mean and its count come back from state.safetensors)."""
    from flwr.app import ArrayRecord

    from skullrec.config import load_config
    from skullrec.federated.server_app import SkullFedAvg, initial_state

    cfg = load_config(REPO / "configs" / "smoke.yaml", TRAIN_SET)
    fed = {"sites": ["a", "b"], "strategy": "fedavg-swa", "swa_start": 2, "rounds": 4, "checkpoint_rounds": [], "evaluate": False}
    globals_ = [build_model(cfg.model, seed=s).state_dict() for s in (11, 12, 13, 14)]  # stand-ins for 4 rounds' FedAvg

    def commit(strategy, server_round: int) -> None:
        r = strategy.offset + server_round
        strategy.pending = {"round": r, "arrays": ArrayRecord(globals_[r - 1]), "errors": {}, "missing": [], "train": {},
                            "sites": {"a": {"num-examples": 1, "dice_loss": 0.5}, "b": {"num-examples": 3, "dice_loss": 0.7}}}
        strategy.aggregate_evaluate(server_round, [])

    first = SkullFedAvg(tmp_path, cfg, fed, {"round": 0, "swa_n": 0}, None)
    commit(first, 1)
    assert not (tmp_path / "swa.safetensors").exists()
    commit(first, 2)
    _, state, swa = initial_state(tmp_path, cfg)  # a new server process
    assert state == {"round": 2, "swa_n": 1} and swa is not None
    second = SkullFedAvg(tmp_path, cfg, fed, state, swa)
    commit(second, 1)
    commit(second, 2)
    mean = {k: np.mean([g[k].double().numpy() for g in globals_[1:]], axis=0) for k in globals_[0]}
    _assert_weights(tmp_path / "swa.safetensors", mean)
    _assert_weights(tmp_path / "final.safetensors", mean)
    _assert_weights(tmp_path / "last.safetensors", {k: v.double().numpy() for k, v in globals_[3].items()})
    assert read_state(tmp_path) == {"round": 4, "swa_n": 3}
    records = read_metrics(tmp_path)
    assert [r["round"] for r in records] == [1, 2, 3, 4] and records[0]["dice_loss"] == pytest.approx((0.5 + 3 * 0.7) / 4)


def test_remote_superlink_mode_names_sites_without_folders(tmp_path: Path) -> None:
    fed = load_federation_config(None, ["superlink=hospitals", f"train_config={REPO / 'configs' / 'baseline.yaml'}"],
                                 [Path("hospitalA"), Path("hospitalB")])
    _, stored = setup_federation(fed, tmp_path / "fed")
    assert stored["superlink"] == "hospitals" and stored["sites"] == ["hospitalA", "hospitalB"]
    assert [s["root"] for s in stored["site_folders"]] == [None, None]
    with pytest.raises(Exception, match="site names must be distinct"):
        load_federation_config(None, ["superlink=h"], [Path("x"), Path("x")])


def test_cyclic_swa_averages_the_last_round_of_each_cycle(tmp_path: Path) -> None:
    """fedavg-swa with cycles of 2 rounds from round 1 of 4: SWA = mean of the global models of rounds 2 and 4
    (each cycle's last, lowest-lr round), and every round's record carries the lr the sites were sent."""
    from flwr.app import ArrayRecord

    from skullrec.config import load_config
    from skullrec.federated.server_app import SkullFedAvg

    cfg = load_config(REPO / "configs" / "smoke.yaml", TRAIN_SET)
    fed = {"sites": ["a", "b"], "strategy": "fedavg-swa", "swa_start": 1, "swa_cycle": 2, "swa_lr": 1e-6, "rounds": 4,
           "checkpoint_rounds": [], "evaluate": False}
    globals_ = [build_model(cfg.model, seed=s).state_dict() for s in (21, 22, 23, 24)]
    strategy = SkullFedAvg(tmp_path, cfg, fed, {"round": 0, "swa_n": 0}, None)
    for r in range(1, 5):
        strategy.pending = {"round": r, "arrays": ArrayRecord(globals_[r - 1]), "errors": {}, "missing": [], "train": {},
                            "sites": {"a": {"num-examples": 1, "dice_loss": 0.5}, "b": {"num-examples": 1, "dice_loss": 0.5}}}
        strategy.aggregate_evaluate(r, [])
        assert (tmp_path / "swa.safetensors").exists() == (r >= 2)
    mean = {k: (globals_[1][k].double().numpy() + globals_[3][k].double().numpy()) / 2 for k in globals_[0]}
    _assert_weights(tmp_path / "swa.safetensors", mean)
    _assert_weights(tmp_path / "final.safetensors", mean)
    assert read_state(tmp_path)["swa_n"] == 2
    half = 0.5 * cfg.train.lr + 0.5 * 1e-6
    np.testing.assert_allclose([r["lr"] for r in read_metrics(tmp_path)], [half, 1e-6, half, 1e-6], rtol=1e-12)


def test_output_folder_rules_are_the_trainers(tmp_path: Path) -> None:
    """A non-empty --out needs --overwrite (run_dir.check_new_run_dir), which replaces only a federation folder."""
    from skullrec.errors import InputError

    fed = load_federation_config(None, ["superlink=hospitals", f"train_config={REPO / 'configs' / 'baseline.yaml'}"],
                                 [Path("hospitalA"), Path("hospitalB")])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="already holds results; pass --resume .* or --overwrite"):
        setup_federation(fed, other)
    with pytest.raises(InputError, match="--overwrite only replaces a federation folder"):
        setup_federation(fed, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
    setup_federation(fed, tmp_path / "fed")
    (tmp_path / "fed" / "stale.txt").write_text("x")
    setup_federation(fed, tmp_path / "fed", overwrite=True)  # a federation folder is replaced whole
    assert not (tmp_path / "fed" / "stale.txt").exists() and (tmp_path / "fed" / "federate.yaml").is_file()
