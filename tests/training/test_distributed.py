"""DistributedDataParallel on 2 CPU processes (gloo): identical ranks, and 2 ranks == 1 rank on the combined batch.

Tolerances (float64, small model, 3 Adam steps, lr 1e-3):
* the two ranks end with bit-identical weights (DDP all-reduces gradients; every rank applies the same update);
* plain Dice loss: 2 ranks vs 1 process on the combined batch agree to 1e-10 in every weight: MONAI DiceLoss
  (batch=False, reduction="mean") is a mean of per-sample losses, so the mean over equal shards of their
  means is the combined mean, and only the summation order differs;
* FAM (trace="signed", the same probes on both ranks): plain autograd to 1e-9; the fast "fd" estimator to
  1e-6. Its per-sample steps make a sample's estimate independent of its shard, but the second difference
  amplifies the rounding of the stacked decoder pass (batch 4 vs 8) by 1/step^2 ~ 1e4 (gradients agree to
  ~1e-11 relative), and Adam's first steps amplify gradient differences of weights whose gradient is near
  0 by up to lr / eps_Adam = 1e5; a single step's gradients are compared to 1e-9 relative in
  test_fd_shards_average_to_the_combined_batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from skullrec.config import FamConfig, ModelConfig
from skullrec.training import distributed, speed
from skullrec.utils import unwrap

SMALL = ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)
MODES = {
    "plain": None,
    "fam-autograd": FamConfig(lam=0.5, estimator="autograd", trace="signed"),
    "fam-fd": FamConfig(lam=0.5, estimator="fd", trace="signed"),
}
STEPS, BATCH = 3, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = (torch.rand(BATCH, 1, 32, 32, 32, generator=g) > 0.6).double()
    y = ((torch.rand(BATCH, 1, 32, 32, 32, generator=g) > 0.7) | (x > 0)).double()
    return x, y


def _train(info: distributed.DistInfo) -> dict[str, dict[str, torch.Tensor]]:
    """The same 3 steps of every mode; each process trains on its shard of each global batch."""
    from skullrec.flatness.regularizer import FamRegularizer
    from skullrec.nets.autoencoder import build_model, loss_function
    from skullrec.training.trainer import train_step

    torch.set_num_threads(1)
    out = {}
    for mode, fam in MODES.items():
        model = distributed.wrap(build_model(SMALL, seed=0).double(), info)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        reg = FamRegularizer(fam, model) if fam is not None else None
        for step in range(STEPS):
            x, y = _data(step)
            idx = distributed.shard(torch.arange(BATCH), info)
            gen = torch.Generator().manual_seed(7 + step)  # the same probes on every rank
            train_step(model, x[idx], y[idx], loss_function(), opt, reg=reg, lam=fam.lam if fam else 0.0, generator=gen)
        out[mode] = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    info, _ = distributed.setup("cpu")
    assert info.world_size == world and info.rank == rank and info.backend == "gloo"
    try:
        torch.save(_train(info), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


def test_shard_pads_and_splits():
    info = distributed.DistInfo(rank=1, world_size=2)
    assert distributed.shard(torch.arange(4), info).tolist() == [2, 3]
    # A last batch of 3 is padded like DistributedSampler: [0, 1, 2, 0] -> rank 1 gets [2, 0].
    assert distributed.shard(torch.arange(3), info).tolist() == [2, 0]
    assert distributed.shard(torch.arange(3), distributed.SINGLE).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_two_ranks_match_each_other_and_one_rank(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = _train(distributed.SINGLE)
    init = _init_weights()
    for mode in MODES:
        for name in r0[mode]:
            assert torch.equal(r0[mode][name], r1[mode][name]), (mode, name)
        moved = max(float((single[mode][k] - init[k]).abs().max()) for k in init)
        assert moved > 1e-4, mode  # the steps did change the weights
        diff = max(float((r0[mode][k] - single[mode][k]).abs().max()) for k in init)
        assert diff <= {"plain": 1e-10, "fam-autograd": 1e-9, "fam-fd": 1e-6}[mode], (mode, diff)
    # FAM changed the trajectory (the comparison above is not just the plain loss twice).
    assert max(float((single["fam-fd"][k] - single["plain"][k]).abs().max()) for k in init) > 1e-6


def _init_weights() -> dict[str, torch.Tensor]:
    from skullrec.nets.autoencoder import build_model

    return {k: v.double() for k, v in build_model(SMALL, seed=0).state_dict().items()}


def test_fd_shards_average_to_the_combined_batch():
    """One step's full gradient: mean over two shards == combined batch (what DDP's averaging computes)."""
    from skullrec.flatness.regularizer import FamRegularizer
    from skullrec.nets.autoencoder import build_model, loss_function

    torch.set_num_threads(1)
    for mode in ("fam-autograd", "fam-fd"):
        fam = MODES[mode]
        model = build_model(SMALL, seed=0).double()
        reg = FamRegularizer(fam, model)
        x, y = _data(0)

        def grad(idx):
            loss = loss_function()(model(x[idx]), y[idx])
            term = reg(model, x[idx], y[idx], loss_function(), loss, torch.Generator().manual_seed(7))
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss + fam.lam * term.penalty, list(model.parameters()))])

        combined = grad(torch.arange(4))
        shards = (grad(torch.arange(2)) + grad(torch.arange(2, 4))) / 2
        assert float((shards - combined).norm() / combined.norm()) <= 1e-9, mode


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["none", "auto"])
def test_torchrun_skullrec_train_matches_one_process(tmp_path, monkeypatch, amp):
    """`torchrun --nproc_per_node 2 -m skullrec train`: rank 0 writes the run, the result is the 1-process one."""
    import json
    import subprocess
    import sys

    import numpy as np
    from safetensors.torch import load_file

    from skullrec.data.layout import write_case

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
    for i in range(4):
        complete = rng.random((32, 32, 32)) > 0.7
        write_case(tmp_path / "data", "train", f"{i:03d}", complete, complete & (rng.random((32, 32, 32)) > 0.3), np.eye(4))
    sets = [
        f"data.root={tmp_path / 'data'}", "data.eval_splits=[]", "data.max_train_cases=null", "data.max_eval_cases=null",
        "model.size=32", "model.channels=[4,8,16,8]", "model.strides=[2,2,2,2]", "train.method=baseline", "fam.lam=0",
        "train.epochs=2", "train.checkpoint_epochs=[2]", "train.num_threads=1", "train.val_every=0",
        # none: float32, with float32's bounds. auto (the default): bf16 on a CPU with native bf16, where the
        # shard and whole-batch roundings differ more: loss 1.2e-6 relative, ||w2 - w1|| 4.7 % of the update (measured).
        f"train.amp={amp}",
    ]
    bf16 = amp == "auto" and speed.resolve_amp("auto", torch.device("cpu")) == "bf16"
    args = ["train", "--config", "configs/smoke.yaml", "--device", "cpu", *sum((["--set", s] for s in sets), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "skullrec", *args, "--run-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          "-m", "skullrec", *args, "--run-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("training ") == 1 and "x 2 processes (gloo)" in ddp.stdout  # only rank 0 prints
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two):  # the all-reduced epoch loss is the combined batch's
        assert a["amp"] == b["amp"] == ("bf16" if bf16 else "none")
        assert b["dice_loss"] == pytest.approx(a["dice_loss"], rel=1e-5 if bf16 else 1e-6)
    wa, wb = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    assert wa.keys() == wb.keys()
    # float32: the shards' sums round differently, and Adam's first steps (lr * g / (|g| + 1e-8)) turn
    # rounding-level differences of near-zero gradients into differences up to ~lr: compare the whole
    # update instead, ||w_2 - w_1|| <= 1 % of ||w_1 - w_init||.
    from skullrec.config import load_config
    from skullrec.nets.autoencoder import build_model

    init = build_model(load_config(tmp_path / "one" / "config.yaml").model, seed=0).state_dict()
    diff = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa) ** 0.5
    update = sum(float((wa[k] - init[k]).pow(2).sum()) for k in wa) ** 0.5
    print(f"torchrun 2 ranks vs 1 process: ||w2 - w1|| {diff:.3g}, ||w1 - w_init|| {update:.3g}")
    assert update > 0 and diff <= (0.1 if bf16 else 1e-2) * update, (diff, update)
