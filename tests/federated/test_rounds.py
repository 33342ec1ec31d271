"""A site's local update across rounds (no Flower processes): the trainer's fam.every schedule continues
over the rounds, the round's learning rate from the server is the one the optimizer steps with, and the
FedSAM + SWA cyclic schedule and SWA collection rounds match values worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, shell_pair
from skullrec.config import load_config
from skullrec.data.cache import load_training_data
from skullrec.data.layout import write_case
from skullrec.federated.client_app import local_train, site_config
from skullrec.federated.server_app import client_lr, swa_collects
from skullrec.nets.autoencoder import build_model

TINY = ["model.size=16", "model.channels=[8, 16, 8]", "model.strides=[2, 2, 2]", "train.num_threads=1",
        "data.max_train_cases=null", "data.max_eval_cases=null", "train.batch_size=1"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site") / "alpha"
    rng = np.random.default_rng(0)
    for i in range(3):  # 3 cases, batch 1: 3 steps per epoch, odd, so every=2 falls differently each epoch
        complete, defective = shell_pair(16, rng)
        write_case(root, "train", f"{i:03d}", complete, defective, np.diag([1.5, 1.5, 1.5, 1.0]))
    return root


def _setup(site: Path, extra: list[str]):
    cfg = site_config(load_config(REPO / "configs" / "smoke.yaml", TINY + extra), str(site))
    model = build_model(cfg.model, seed=cfg.seed)
    return cfg, model, load_training_data(cfg.data, cfg.model.size, "cpu")


def test_fam_every_counts_steps_across_rounds(site: Path) -> None:
    """fam.every=2 over 3 steps per round: global steps 0..2 regularise 0 and 2, steps 3..5 only 4.

    A schedule restarting each round would regularise 2 steps in round 2 as well."""
    cfg, model, data = _setup(site, ["train.method=fam", "fam.every=2", "fam.lam=0.002"])
    reg = [local_train(cfg, model, data, round_=r, local_epochs=1, site="alpha")["reg_steps"] for r in (1, 2, 3)]
    by_hand = [sum(1 for step in range(3 * (r - 1), 3 * r) if step % 2 == 0) for r in (1, 2, 3)]
    assert by_hand == [2, 1, 2]
    assert reg == by_hand


def test_the_round_lr_is_what_the_optimizer_steps_with(site: Path) -> None:
    """lr 0 from the server leaves the weights as received (Adam and SAM alike); the configured lr moves them."""
    for method in ("baseline", "sam"):
        cfg, model, data = _setup(site, [f"train.method={method}", "fam.lam=0.0"])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = local_train(cfg, model, data, round_=1, local_epochs=1, site="alpha", lr=0.0)
        assert out["lr"] == 0.0
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (method, k)
        out = local_train(cfg, model, data, round_=1, local_epochs=1, site="alpha")
        assert out["lr"] == cfg.train.lr
        assert not torch.equal(model.state_dict()["decodeL.weight"], before["decodeL.weight"])


def test_cyclic_lr_and_swa_collection_rounds() -> None:
    """swa_start 3, cycles of 2 rounds, lr 1e-3 -> swa_lr 1e-5: lr(j) = (1 - j/2) * 1e-3 + (j/2) * 1e-5."""
    fed = {"strategy": "fedavg-swa", "swa_start": 3, "swa_cycle": 2, "swa_lr": 1e-5}
    lrs = [client_lr(fed, 1e-3, r) for r in range(1, 8)]
    half = 0.5 * 1e-3 + 0.5 * 1e-5
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, half, 1e-5, half, 1e-5, half], rtol=1e-12)
    assert [r for r in range(1, 8) if swa_collects(fed, r)] == [4, 6]  # each cycle's last (lowest-lr) round
    # swa_cycle 1: constant lr, every round from swa_start is collected; fedavg: never, and the lr is constant
    assert [client_lr({**fed, "swa_cycle": 1}, 1e-3, r) for r in (1, 3, 5)] == [1e-3] * 3
    assert [r for r in range(1, 6) if swa_collects({**fed, "swa_cycle": 1}, r)] == [3, 4, 5]
    assert not any(swa_collects({**fed, "strategy": "fedavg"}, r) for r in range(1, 8))
    assert client_lr({**fed, "strategy": "fedavg"}, 1e-3, 4) == 1e-3
    # the default swa_lr is lr / 100 (the authors' 1e-2 -> 1e-4)
    assert client_lr({**fed, "swa_lr": None}, 1e-3, 4) == pytest.approx(1e-5)
