"""skullrec.training.batched: several seeds trained together (vmap over stacked weights) against training each alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_shell_dataset
from skullrec.config import load_config
from skullrec.nets.autoencoder import build_model, loss_function
from skullrec.nets.checkpoint import load_training_state
from skullrec.training import batched as B
from skullrec.training.run_dir import LAST, checkpoint_path, read_metrics, run_finished
from skullrec.training.trainer import make_optimizer, train, train_step

SMOKE = REPO / "configs" / "smoke.yaml"
# Bound on |vmapped - alone| of any weight after the steps below (lr 1e-3 Adam; see the module doc):
# the grouped-convolution rounding (~1e-6 of the gradient) carried by Adam's normalised steps.
WEIGHT_TOL = 2e-3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shell_dataset(tmp_path_factory.mktemp("batched_data"))


def _cfg(data_root: Path, seed: int, **extra: object):
    sets = [f"data.root={data_root}", "data.max_train_cases=8", "data.eval_splits=[]", "model.size=16",
            "model.channels=[8, 16, 8]", "model.strides=[2, 2, 2]", "train.method=baseline", "train.epochs=2",
            "train.checkpoint_epochs=[1, 2]", "train.num_threads=1", "train.lr=1e-3", "fam.lam=0.0",
            f"seed={seed}", f"name=b_seed{seed}"]
    return load_config(SMOKE, sets + [f"{k}={json.dumps(v)}" for k, v in extra.items()])


def test_stacked_adam_is_bit_for_bit_the_separate_optimizers(data_root: Path) -> None:
    """Given the same gradients, the one stacked optimizer moves every run exactly as its own would."""
    cfgs = [_cfg(data_root, s) for s in (0, 1, 2)]
    models = [build_model(c.model, seed=c.seed) for c in cfgs]
    alone = [copy.deepcopy(m) for m in models]
    opts = [make_optimizer(c, m) for c, m in zip(cfgs, alone)]
    stack = B.StackedModels(models)
    sopt = make_optimizer(cfgs[0], stack)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in stack.params.items()}
        for i, (m, o) in enumerate(zip(alone, opts)):
            for k, p in m.named_parameters():
                p.grad = grads[k][i].clone()
            o.step()
        for k, p in stack.params.items():
            p.grad = grads[k].clone()
        sopt.step()
    for i, m in enumerate(alone):
        mine = stack.state_dict(i)
        for k, v in m.state_dict().items():
            assert torch.equal(mine[k], v), (i, k)


def _seed_models_and_batches(data_root: Path, n: int) -> tuple[list, list[torch.nn.Module], torch.Tensor, torch.Tensor]:
    """Configs and models of seeds 0..n-1, one random (4, 1, 16, 16, 16) batch and target per model."""
    cfgs = [_cfg(data_root, s) for s in range(n)]
    models = [build_model(c.model, seed=c.seed) for c in cfgs]
    gen = torch.Generator().manual_seed(1)
    xs = (torch.rand(n, 4, 1, 16, 16, 16, generator=gen) > 0.6).float()
    ys = torch.clamp(xs + (torch.rand(xs.shape, generator=gen) > 0.9).float(), 0, 1)
    return cfgs, models, xs, ys


def _step_stacked_and_alone(cfgs: list, models: list[torch.nn.Module], stack: B.StackedModels, xs: torch.Tensor,
                            ys: torch.Tensor, steps: int = 5) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``steps`` steps of the stack (one optimizer) and of each model alone (its own); per step (stacked losses, losses alone)."""
    loss_fn = loss_function(cfgs[0].model.loss)
    sopt = make_optimizer(cfgs[0], stack)
    opts = [make_optimizer(c, m) for c, m in zip(cfgs, models)]
    out = []
    for _ in range(steps):
        losses = B.batched_step(stack, xs, ys, loss_fn, sopt)
        out.append((losses, [train_step(m, xs[i], ys[i], loss_fn, o).loss for i, (m, o) in enumerate(zip(models, opts))]))
    return out


def test_vmapped_forward_and_step_match_each_model_alone(data_root: Path) -> None:
    cfgs, models, xs, ys = _seed_models_and_batches(data_root, 2)
    stack = B.StackedModels([copy.deepcopy(m) for m in models], forward="vmap")
    with torch.no_grad():
        out = stack(xs)
        for i, m in enumerate(models):
            ref = m(xs[i])
            # the grouped convolution's rounding, nothing more (outputs ~0.5: 1.1e-6 .. 2.1e-6 seen, by CPU)
            assert (out[i] - ref).abs().max() < 5e-6
            assert (out[0] - models[1](xs[0])).abs().max() > 1e-2  # the two models really differ
    for losses, alone in _step_stacked_and_alone(cfgs, models, stack, xs, ys):
        assert all(abs(float(losses[i]) - float(a)) < 1e-4 for i, a in enumerate(alone))
    for i, m in enumerate(models):
        mine = stack.state_dict(i)
        worst = max(float((mine[k] - v).abs().max()) for k, v in m.state_dict().items())
        assert worst < WEIGHT_TOL, worst


def test_looped_step_is_bit_for_bit_each_model_alone(data_root: Path) -> None:
    """The CPU forward (a loop over the stacked weights' slices) reproduces training alone exactly."""
    cfgs, models, xs, ys = _seed_models_and_batches(data_root, 3)
    stack = B.StackedModels([copy.deepcopy(m) for m in models], forward="loop")
    for losses, alone in _step_stacked_and_alone(cfgs, models, stack, xs, ys):
        assert all(torch.equal(losses[i], a) for i, a in enumerate(alone))
    for i, m in enumerate(models):
        mine = stack.state_dict(i)
        for k, v in m.state_dict().items():
            assert torch.equal(mine[k], v), (i, k)
    assert not torch.equal(stack.state_dict(0)["decodeL.weight"], stack.state_dict(1)["decodeL.weight"])
    assert B.default_forward(torch.device("cpu")) == "loop" and B.default_forward(torch.device("cuda")) == "vmap"
    with pytest.raises(ValueError, match="forward"):
        B.StackedModels(models, forward="grouped")


def test_train_batched_writes_the_runs_train_would(data_root: Path, tmp_path: Path) -> None:
    """On a CPU (forward "loop") every batched run is bit-for-bit the run ``train`` makes alone."""
    cfgs = [_cfg(data_root, s) for s in (0, 1)]
    dirs = [tmp_path / f"seed{s}" for s in (0, 1)]
    lines: list[str] = []
    last = B.train_batched(cfgs, dirs, "cpu", log=lines.append)
    assert len(last) == 2 and lines[0].startswith("training 2 runs together") and lines[0].endswith("forward loop")
    for cfg, d in zip(cfgs, dirs):
        assert run_finished(d)
        assert checkpoint_path(d, 1).is_file() and checkpoint_path(d, 2).is_file()
        recs = read_metrics(d / "metrics.jsonl")
        assert [r["epoch"] for r in recs] == [1, 2] and all(r["batched_runs"] == 2 and r["batched_forward"] == "loop" for r in recs)
        # The "auto" speed switches are recorded as the batched run trained: float32, eager.
        stored = yaml.safe_load((d / "config.yaml").read_text())["train"]
        assert (stored["amp"], stored["compile"]) == ("none", False)
        # Trained alone by the ordinary trainer: the same run within the stated tolerance.
        alone = tmp_path / f"alone_{cfg.seed}"
        alone.mkdir()
        (alone / "config.yaml").write_text((d / "config.yaml").read_text())
        rec = train(B.float32_eager(cfg), alone, device="cpu")  # as the batched run trained (and recorded)
        assert rec["dice_loss"] == recs[-1]["dice_loss"]
        for epoch_file in (LAST, checkpoint_path(d, 1).name):
            a, b = load_file(str(d / epoch_file)), load_file(str(alone / epoch_file))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), epoch_file
        # The optimizer state is the run's own: the ordinary trainer can resume from it.
        state = load_training_state(d / "state.pt")
        assert state["epoch"] == 2 and len(state["optimizer"]["state"]) == len(a)
    w0, w1 = load_file(str(dirs[0] / LAST)), load_file(str(dirs[1] / LAST))
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-2  # seeds stay distinct runs


def test_batch_key_groups_only_seed_variants(data_root: Path) -> None:
    a, b = _cfg(data_root, 0), _cfg(data_root, 1)
    assert B.batch_key(a) == B.batch_key(b) is not None
    assert B.batch_key(_cfg(data_root, 0, **{"train.lr": 2e-3})) != B.batch_key(a)
    assert B.batch_key(_cfg(data_root, 0, **{"train.method": "fam", "fam.lam": 0.01})) is None
    # "auto" speed switches batch (settled to float32 eager); an explicit bf16 or compile is trained alone.
    assert B.batch_key(_cfg(data_root, 0, **{"train.amp": "none", "train.compile": False})) == B.batch_key(a)
    assert B.batch_key(_cfg(data_root, 0, **{"train.amp": "bf16"})) is None
    assert B.batch_key(_cfg(data_root, 0, **{"train.compile": True})) is None
    with pytest.raises(ValueError):
        B.train_batched([a, _cfg(data_root, 1, **{"train.lr": 2e-3})], [Path("x"), Path("y")])
