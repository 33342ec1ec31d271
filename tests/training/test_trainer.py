"""Training loop: the step, the run folder, metrics, reproducibility, kill -9 / Ctrl-C and resume.

Everything runs on a tiny data set written here (hollow spheres with a cap cut away, 16^3) with a
3-stage model at 16^3 (bottleneck 8 x 2^3, so decodeL is still 64 x 8), on one CPU thread.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_shell_dataset
from monai.losses import DiceLoss
from safetensors.torch import load_file
from typer.testing import CliRunner

from skullrec.cli import app, train_command
from skullrec.config import load_config
from skullrec.data.layout import load_split, write_case
from skullrec.errors import InputError
from skullrec.flatness.regularizer import FamRegularizer
from skullrec.nets.autoencoder import build_model, get_linear
from skullrec.nets.checkpoint import load_checkpoint, load_training_state
from skullrec.training.run_dir import checkpoint_path, run_finished
from skullrec.training.trainer import train, train_step

SMOKE = REPO / "configs" / "smoke.yaml"
EPOCHS = 3  # 8 cases, batch 4: 2 steps per epoch


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    return write_shell_dataset(root)


def _overrides(data_root: Path, method: str = "fam", **extra: object) -> list[str]:
    sets = [
        f"data.root={data_root}",
        "data.max_train_cases=8",
        "model.size=16",
        "model.channels=[8, 16, 8]",
        "model.strides=[2, 2, 2]",
        f"train.method={method}",
        f"train.epochs={EPOCHS}",
        "train.checkpoint_epochs=[2, 3]",
        "train.num_threads=1",
        f"fam.lam={0.01 if method == 'fam' else 0.0}",
    ]
    return sets + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in extra.items()]


def _train(data_root: Path, run_dir: Path, method: str = "fam", resume: bool = False, **extra: object) -> None:
    train_command(
        config=SMOKE, overrides=_overrides(data_root, method, **extra), run_dir=None if resume else run_dir,
        resume=run_dir if resume else None, force=False, device="cpu", overwrite=False,
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _References(dict):
    """Uninterrupted runs, one per method, trained on first use; interrupted runs must reproduce them."""

    def __init__(self, data_root: Path, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.data_root, self.factory = data_root, factory

    def __missing__(self, method: str) -> Path:
        if method in ("sam", "asam"):
            pytest.importorskip("skullrec.training.sam")
        run_dir = self.factory.mktemp("ref") / method
        _train(self.data_root, run_dir, method)
        self[method] = run_dir
        return run_dir


@pytest.fixture(scope="module")
def reference_runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _References(data_root, tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# The step


def _tiny(data_root: Path, method: str = "fam"):
    cfg = load_config(SMOKE, _overrides(data_root, method))
    split = load_split(data_root, "train", max_cases=4)
    x = torch.from_numpy(split.defective[:, None]).float()
    y = torch.from_numpy(split.complete[:, None]).float()
    return cfg, x, y


def test_train_step_adds_lam_times_penalty_to_the_gradient(data_root: Path) -> None:
    """With SGD(lr=1) the update equals minus the gradient of loss + lam * penalty, computed independently."""
    cfg, x, y = _tiny(data_root)
    loss_fn, lam = DiceLoss(to_onehot_y=True, softmax=True), 0.5
    model = build_model(cfg.model, seed=0)
    ref = build_model(cfg.model, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, x, y, loss_fn, torch.optim.SGD(model.parameters(), lr=1.0),
                     reg=FamRegularizer(cfg.fam, model), lam=lam, generator=torch.Generator().manual_seed(7))

    ref_reg = FamRegularizer(cfg.fam, ref)  # before the forward pass, as in the trainer (fast estimators record it)
    loss = loss_fn(ref(x), y)
    term = ref_reg(ref, x, y, loss_fn, loss, torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(loss + lam * term.penalty, list(ref.parameters()), allow_unused=True)
    assert float(out.loss) == float(loss.detach())
    assert float(out.penalty) == pytest.approx(float(term.penalty.detach()), rel=1e-6)
    assert float(term.penalty.detach()) != 0
    for p0, p1, g in zip(before, model.parameters(), grads):
        expected = p0 - (g if g is not None else 0)
        torch.testing.assert_close(p1.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adaptive,lookbehind", [(False, False), (True, False), (False, True)])
def test_sam_step_uses_the_gradient_at_the_perturbed_point(data_root: Path, adaptive: bool, lookbehind: bool) -> None:
    """SAM/ASAM around SGD(lr=1): the update is minus the gradient at w + e, e computed here by hand.
    Lookbehind with k = 1, alpha = 1 is that same SAM step (through train_step's Lookbehind branch)."""
    sam_mod = pytest.importorskip("skullrec.training.sam")
    from skullrec.training.lookbehind import Lookbehind

    cfg, x, y = _tiny(data_root, "sam")
    loss_fn, rho, eta = DiceLoss(to_onehot_y=True, softmax=True), 0.05, 0.01
    model = build_model(cfg.model, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    if lookbehind:
        opt = Lookbehind(model.parameters(), torch.optim.SGD, rho=rho, k=1, alpha=1.0, lr=1.0)
    else:
        opt = sam_mod.SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=1.0)
    train_step(model, x, y, loss_fn, opt, sam=True)

    ref = build_model(cfg.model, seed=0)
    params = list(ref.parameters())
    g = torch.autograd.grad(loss_fn(ref(x), y), params)
    t = [(p.detach().abs() + eta) if adaptive else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    with torch.no_grad():
        for p, ti, gi in zip(params, t, g):
            p.add_(rho * ti * ti * gi / norm)
    g_adv = torch.autograd.grad(loss_fn(ref(x), y), params)
    for p0, p1, ga in zip(before, model.parameters(), g_adv):
        torch.testing.assert_close(p1.detach(), p0 - ga, rtol=1e-5, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(g, g_adv))  # the perturbation mattered


def test_train_step_returns_device_tensors_without_reg(data_root: Path) -> None:
    cfg, x, y = _tiny(data_root, "baseline")
    model = build_model(cfg.model, seed=0)
    out = train_step(model, x, y, DiceLoss(to_onehot_y=True, softmax=True), torch.optim.Adam(model.parameters(), lr=1e-4))
    assert isinstance(out.loss, torch.Tensor) and out.loss.ndim == 0 and not out.loss.requires_grad
    assert out.penalty is None and out.trace is None


# ----------------------------------------------------------------------------------------------
# A whole run


def test_run_folder_metrics_and_checkpoints(reference_runs: dict[str, Path], data_root: Path) -> None:
    run = reference_runs["fam"]
    names = sorted(p.name for p in run.iterdir())
    assert names == [".skullrec-train.lock", "best.safetensors", "ckpt_epoch002.safetensors", "ckpt_epoch003.safetensors", "config.yaml",
                     "last.safetensors", "metrics.jsonl", "state.pt"]
    assert checkpoint_path(run, 2).name == "ckpt_epoch002.safetensors" and run_finished(run)
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["reg_steps"] == 2 and r["seconds"] > 0
        assert np.isfinite([r["dice_loss"], r["regularizer"], r["trace"], r["kappa_hat"], r["norm_sq"]]).all()
        assert set(r["val_dsc"]) == {"eval_set1", "eval_set2"}
        assert r["val_dsc_mean"] == pytest.approx(np.mean(list(r["val_dsc"].values())))

    # Validation DSC and ||w||^2 of the last epoch, recomputed independently from the checkpoint.
    model, cfg, meta = load_checkpoint(run / "last.safetensors")
    assert meta["epoch"] == 3 and cfg.train.method == "fam"
    last = records[-1]
    assert last["norm_sq"] == pytest.approx(float((get_linear(model, "decodeL").weight.detach().double() ** 2).sum()), rel=1e-6)
    for split_name in ("eval_set1", "eval_set2"):
        split = load_split(data_root, split_name)
        with torch.no_grad():
            out = model(torch.from_numpy(split.defective[:, None]).float())
            # bone where the bone channel wins (softmax_dice, the default) / where the one logit is > 0
            pred = ((out[:, 1] > out[:, 0]) if out.shape[1] == 2 else (out[:, 0] > 0)).numpy()
        truth = split.complete.astype(bool)
        dsc = [2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in zip(pred, truth)]
        assert last["val_dsc"][split_name] == pytest.approx(float(np.mean(dsc)), abs=1e-6)

    # best = the lowest training Dice loss (no validation split carved here): the evaluation splits are
    # monitored but never choose a checkpoint; epoch checkpoints carry their epoch.
    best_epoch = min(records, key=lambda r: r["dice_loss"])["epoch"]
    assert load_checkpoint(run / "best.safetensors")[2]["epoch"] == best_epoch
    assert "selection_dsc" not in records[-1]
    assert load_checkpoint(run / "ckpt_epoch002.safetensors")[2]["epoch"] == 2


def test_best_is_chosen_on_a_validation_split_carved_from_the_training_cases(data_root: Path, tmp_path: Path) -> None:
    from skullrec.data.build import split_cases
    from skullrec.data.cache import load_training_data

    run = tmp_path / "val"
    _train(data_root, run, "baseline", **{"data.val_fraction": 0.25, "train.val_every": 1})
    records = _metrics(run)
    assert all(0.0 <= r["selection_dsc"] <= 1.0 for r in records)
    best = max(records, key=lambda r: r["selection_dsc"])  # the held-out val_dsc plays no part
    _, _, meta = load_checkpoint(run / "best.safetensors")
    assert meta["epoch"] == best["epoch"] and meta["best_by"] == "selection_dsc"
    # the carve: prepare's seeded split rule on the training ids, those cases left out of training
    cfg = load_config(run / "config.yaml")
    data = load_training_data(cfg.data, cfg.model.size, "cpu")
    all_ids = load_split(data_root, "train", max_cases=8).ids
    keep, held = split_cases(list(all_ids), 0.25, 0)
    assert data.val is not None and data.val.ids == held and data.train.ids == keep and len(held) == 2
    assert not set(data.val.ids) & set(data.train.ids)
    with torch.no_grad():  # the logged selection DSC is the checkpoint's DSC on exactly those cases
        model = load_checkpoint(run / "last.safetensors")[0]
        out = model(data.val.defective.float())
        pred, truth = (out[:, 1] > out[:, 0]).numpy(), data.val.complete[:, 0].numpy().astype(bool)
    dsc = [2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in zip(pred, truth)]
    assert records[-1]["selection_dsc"] == pytest.approx(float(np.mean(dsc)), abs=1e-6)


def test_baseline_and_sam_log_monitored_flatness(reference_runs: dict[str, Path]) -> None:
    for method in ("baseline", "sam", "lookbehind"):
        records = _metrics(reference_runs[method])
        assert all(r["method"] == method and r["reg_steps"] == 0 and r["trace"] is None for r in records)
        assert all(np.isfinite(r["monitor_trace"]) and np.isfinite(r["monitor_kappa_hat"]) for r in records)
    assert all(r["sam"] for r in _metrics(reference_runs["sam"]))
    assert all(r["sam"] for r in _metrics(reference_runs["lookbehind"]))


def test_same_seed_same_bytes_other_seed_differs(reference_runs: dict[str, Path], data_root: Path, tmp_path: Path) -> None:
    _train(data_root, tmp_path / "again", "fam")
    _assert_same_weights(reference_runs["fam"] / "last.safetensors", tmp_path / "again" / "last.safetensors")
    _train(data_root, tmp_path / "seed1", "fam", seed=1, **{"train.epochs": 1, "train.checkpoint_epochs": [1]})
    w0 = _weights(reference_runs["fam"] / "ckpt_epoch002.safetensors")
    w1 = _weights(tmp_path / "seed1" / "last.safetensors")
    assert not torch.equal(w0["decodeL.weight"], w1["decodeL.weight"])


def test_late_sam_uses_plain_steps_first(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("skullrec.training.sam")
    _train(data_root, tmp_path / "late", "sam", **{"sam.start_epoch": 3})
    assert [r["sam"] for r in _metrics(tmp_path / "late")] == [False, False, True]


# ----------------------------------------------------------------------------------------------
# Interruptions

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import skullrec.training.trainer as T

    mode, target, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = {"n": 0}
    orig_step, orig_metrics = T.train_step, T.write_metrics

    def step(*args, **kwargs):
        out = orig_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == target and mode in ("kill-step", "sigint"):
            os.kill(os.getpid(), signal.SIGKILL if mode == "kill-step" else signal.SIGINT)
        return out

    def metrics(path, records):
        orig_metrics(path, records)
        if mode == "kill-commit" and len(records) == target:
            os.kill(os.getpid(), signal.SIGKILL)  # checkpoints and metrics written, state not yet

    T.train_step, T.write_metrics = step, metrics
    from skullrec.cli import app
    app(sys.argv[4:], prog_name="skullrec")
    """
)


def _child(mode: str, target: int, method: str, data_root: Path, run_dir: Path) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(SMOKE), "--run-dir", str(run_dir), "--device", "cpu"]
    for s in _overrides(data_root, method):
        args += ["--set", s]
    return subprocess.run([sys.executable, "-c", _CHILD, mode, str(target), method, *args],
                          capture_output=True, text=True, timeout=600, cwd=run_dir.parent)


@pytest.mark.parametrize(
    "mode,target,method",
    [
        ("kill-step", 3, "fam"),  # SIGKILL after the 1st step of epoch 2 (the epoch's commit never happens)
        ("kill-commit", 2, "sam"),  # SIGKILL after epoch 2's checkpoints and metrics, before its state (SAM's
        # base optimizer state must survive the resume)
        ("kill-step", 3, "lookbehind"),  # Lookbehind-SAM: its k Adam steps per batch resume exactly too
    ],
)
def test_kill9_then_resume_equals_uninterrupted(
    mode: str, target: int, method: str, data_root: Path, reference_runs: dict[str, Path], tmp_path: Path
) -> None:
    if method == "sam":
        pytest.importorskip("skullrec.training.sam")
    run = tmp_path / "run"
    proc = _child(mode, target, method, data_root, run)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_training_state(run / "state.pt")["epoch"] == 1  # only epoch 1 was committed
    if mode == "kill-commit":
        assert [r["epoch"] for r in _metrics(run)] == [1, 2]  # epoch 2 logged but not committed
    _train(data_root, run, method, resume=True)
    _assert_same_weights(reference_runs[method] / "last.safetensors", run / "last.safetensors")
    _assert_same_weights(reference_runs[method] / "ckpt_epoch002.safetensors", run / "ckpt_epoch002.safetensors")
    ref_records, records = _metrics(reference_runs[method]), _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for a, b in zip(ref_records, records):
        assert (a["dice_loss"], a.get("val_dsc"), a.get("trace")) == (b["dice_loss"], b.get("val_dsc"), b.get("trace"))


def test_ctrl_c_saves_mid_epoch_and_resume_equals_uninterrupted(data_root: Path, reference_runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _child("sigint", 3, "fam", data_root, run)  # Ctrl-C during the first step of epoch 2
    assert proc.returncode == 130, proc.stderr
    assert f"skullrec train --resume {run}" in proc.stderr
    state = load_training_state(run / "state.pt")
    assert (state["epoch"], state["step"]) == (2, 1)
    _train(data_root, run, "fam", resume=True)
    _assert_same_weights(reference_runs["fam"] / "last.safetensors", run / "last.safetensors")
    assert [r["dice_loss"] for r in _metrics(run)] == [r["dice_loss"] for r in _metrics(reference_runs["fam"])]


# ----------------------------------------------------------------------------------------------
# Run-folder rules and user errors


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_run_folder_rules(data_root: Path, reference_runs: dict[str, Path], tmp_path: Path) -> None:
    sets = [a for s in _overrides(data_root, "fam", **{"train.epochs": 1, "train.checkpoint_epochs": [1]}) for a in ("--set", s)]
    run = tmp_path / "r"
    (run / "notes").mkdir(parents=True)
    code, out = _cli("train", "--config", str(SMOKE), "--run-dir", str(run), "--device", "cpu", *sets)
    assert code == 2 and "already holds results; pass --resume" in out and out.count("\n") == 1
    code, out = _cli("train", "--config", str(SMOKE), "--run-dir", str(run), "--device", "cpu", "--overwrite", *sets)
    assert code == 0, out
    assert (run / "notes").is_dir() and (run / "last.safetensors").is_file()  # --overwrite removes only run files

    # Resuming with another config is refused unless --force; a finished run has nothing to do.
    code, out = _cli("train", "--config", str(SMOKE), "--resume", str(run), "--device", "cpu", *sets, "--set", "fam.lam=0.5")
    assert code == 2 and "fam.lam (0.01 -> 0.5)" in out and "--force" in out
    code, out = _cli("train", "--config", str(SMOKE), "--resume", str(run), "--device", "cpu", *sets)
    assert code == 0 and "already finished" in out
    code, out = _cli("train", "--resume", str(run), "--device", "cpu", "--force", "--set", "train.epochs=2")
    assert code == 0, out
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    code, out = _cli("train", "--config", str(SMOKE), "--resume", str(run), "--device", "cpu", *sets, "--set", "model.channels=[8,16,16]", "--force")
    assert code == 2 and "cannot change the model architecture" in out


def test_a_second_writer_of_a_run_folder_is_refused(data_root: Path, reference_runs: dict[str, Path], tmp_path: Path) -> None:
    import fcntl
    import shutil

    run = tmp_path / "busy"
    shutil.copytree(reference_runs["fam"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with open(run / ".skullrec-train.lock", "a+") as held:  # what a running trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out = _cli("train", "--resume", str(run), "--device", "cpu", "--force", "--set", "train.epochs=3")
        assert code == 2 and out.strip() == f"error: {run}: another skullrec train is writing this run folder; wait for it or stop it first"
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched
    # once the holder has gone (a killed trainer's lock goes with it) the resume proceeds
    code, out = _cli("train", "--resume", str(run), "--device", "cpu", "--force", "--set", "train.epochs=3")
    assert code == 0, out
    assert [r["epoch"] for r in _metrics(run)][-1] == 3


def test_resume_on_other_data_is_refused(data_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    run = tmp_path / "run"
    _train(root, run, "baseline", **{"train.epochs": 1, "train.checkpoint_epochs": [1]})
    split = load_split(root, "train", max_cases=1)
    complete = split.complete[0].copy()
    complete[0, 0, 0] = 1 - complete[0, 0, 0]  # one voxel
    write_case(root, "train", split.ids[0], complete, split.defective[0] & complete, split.affines[0])
    cfg = load_config(SMOKE, _overrides(root, "baseline", **{"train.epochs": 2, "train.checkpoint_epochs": [1]}))
    with pytest.raises(InputError, match="training data differ from those the run .* was trained on; pass --force"):
        train(cfg, run, device="cpu", resume=True)


def test_user_errors_are_one_line(data_root: Path, tmp_path: Path) -> None:
    code, out = _cli("train", "--config", str(SMOKE), "--run-dir", str(tmp_path / "a"), "--device", "cpu",
                     "--set", f"data.root={data_root}", "--set", "data.max_train_cases=2")
    assert code == 2 and "volumes are 16x16x16 but model.size is 64" in out and out.count("\n") == 1
    assert not (tmp_path / "a").exists()  # a data problem is reported before the run folder is made
    code, out = _cli("train", "--config", str(SMOKE), "--run-dir", str(tmp_path / "b"), "--set", f"data.root={tmp_path / 'none'}", "--device", "cpu")
    assert code == 2 and "split 'train' not found" in out
    code, out = _cli("train", "--config", str(SMOKE), "--device", "tpu")
    assert code == 2 and "--device tpu" in out
    code, out = _cli("train", "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "not a run folder" in out
    with pytest.raises(InputError, match="--config: required"):
        train_command(config=None, overrides=[], run_dir=None, resume=None, force=False, device="cpu", overwrite=False)
