"""lambda on a scale that means something: fam_grad_ratio, method fam_authors, and skullrec flatness's lambdas.

* ``grad_ratio`` against gradients accumulated separately in ``.grad`` (an independent path);
* ``fam_authors``: config fixes its keys; the trainer's step equals the authors' objective written out
  here with MONAI's sum-reduced softmax Dice (80 * DiceLoss_sum + lam * ||W||_F * Tr(H[DiceLoss_sum]),
  trace detached), same probe;
* metrics.jsonl carries ``fam_grad_ratio`` (FAM methods, every epoch) and the per-unit-lambda ratio at
  validation epochs of the other methods; the ratio is linear in lambda;
* ``lambda_scale``: the lambda it reports for a ratio gives that ratio; the paper-equivalent lambda gives
  our objective the authors' ratio.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from skullrec.config import FamConfig, ModelConfig, config_from_dict
from skullrec.errors import ConfigError
from skullrec.flatness.hessian import rademacher
from skullrec.flatness.measure import lambda_scale
from skullrec.flatness.regularizer import FamRegularizer, grad_ratio
from skullrec.nets.autoencoder import build_model, loss_function
from conftest import write_shell_dataset

torch.set_num_threads(1)
SMALL = dict(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)
REPO = Path(__file__).resolve().parents[2]


def _setup(seed: int = 0, loss: str = "softmax_dice"):
    model = build_model(ModelConfig(**SMALL, loss=loss), seed=seed).double()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(4, 1, 32, 32, 32, generator=gen) > 0.6).double()
    y = ((torch.rand(4, 1, 32, 32, 32, generator=gen) > 0.6) | (x > 0)).double()
    return model, x, y


def _grads_in_dot_grad(model, term_fn) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    term_fn().backward()
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def test_grad_ratio_matches_separately_accumulated_gradients():
    model, x, y = _setup(1)
    loss_fn = loss_function("softmax_dice")
    fam = FamConfig(lam=1.0, estimator="autograd", trace="signed")
    reg = FamRegularizer(fam, model)
    got = grad_ratio(model, x, y, loss_fn, reg, torch.Generator().manual_seed(3), lam=0.7)
    g_loss = _grads_in_dot_grad(model, lambda: loss_fn(model(x), y))
    g_pen = _grads_in_dot_grad(model, lambda: 0.7 * reg(model, x, y, loss_fn, loss_fn(model(x), y), torch.Generator().manual_seed(3)).penalty)
    norm = lambda gs: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))  # noqa: E731
    assert got["all"] == pytest.approx(norm(g_pen) / norm(g_loss), rel=1e-10)
    i = [n for n, _ in model.named_parameters()].index("decodeL.weight")
    assert got["decodeL"] == pytest.approx(float(g_pen[i].norm() / g_loss[i].norm()), rel=1e-10)
    assert got["all"] > 0 and got["decodeL"] > 0
    # linear in lambda (same probes)
    twice = grad_ratio(model, x, y, loss_fn, reg, torch.Generator().manual_seed(3), lam=1.4)
    assert twice["all"] == pytest.approx(2 * got["all"], rel=1e-10)


def test_fam_authors_fixes_its_keys():
    cfg = config_from_dict({"train": {"method": "fam_authors"}, "fam": {"lam": 0.02}})
    assert (cfg.model.loss, cfg.fam.norm, cfg.fam.gradient, cfg.fam.trace) == ("softmax_dice", "frobenius", "detached", "signed")
    with pytest.raises(ConfigError, match="fam.norm: method fam_authors fixes it to 'frobenius', got 'squared'"):
        config_from_dict({"train": {"method": "fam_authors"}, "fam": {"lam": 0.02, "norm": "squared"}})
    with pytest.raises(ConfigError, match="model.loss: method fam_authors fixes it"):
        config_from_dict({"train": {"method": "fam_authors"}, "fam": {"lam": 0.02}, "model": {"loss": "sigmoid_dice"}})
    with pytest.raises(ConfigError, match="fam.lam: method 'fam_authors' needs lam > 0"):
        config_from_dict({"train": {"method": "fam_authors"}})
    # The resolved config round-trips (what a run folder / checkpoint stores).
    assert config_from_dict(cfg.to_dict()) == cfg


def test_fam_authors_step_is_the_authors_objective():
    """SGD(lr=1): the update is minus the gradient of 80 * DiceLoss_sum + lam * ||W||_F * Tr(H[DiceLoss_sum]) (Tr detached)."""
    from skullrec.training.trainer import objective_scales, train_step

    cfg = config_from_dict({"model": SMALL, "train": {"method": "fam_authors"}, "fam": {"lam": 0.3, "estimator": "autograd"}})
    model, x, y = _setup(2)
    ref = build_model(cfg.model, seed=2).double()
    ref.load_state_dict(model.state_dict())
    loss_fn = loss_function(cfg.model.loss)
    reg = FamRegularizer(cfg.fam, model)
    assert objective_scales(cfg, 4) == (80.0 * 4 * 2, 4.0 * 2)
    ls, ps = objective_scales(cfg, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, x, y, loss_fn, opt, reg=reg, lam=cfg.fam.lam, generator=torch.Generator().manual_seed(9),
               loss_scale=ls, penalty_scale=ps)

    # The authors' objective written out, independently of the trainer's scaling.
    crit = DiceLoss(to_onehot_y=True, softmax=True, reduction="sum")
    w = ref.decodeL.weight
    probe = rademacher(1, w, torch.Generator().manual_seed(9))[0]
    loss_sum = crit(ref(x), y)
    (g,) = torch.autograd.grad(loss_sum, w, create_graph=True)
    (hv,) = torch.autograd.grad((g * probe).sum(), w, retain_graph=True)
    trace_sum = float((hv * probe).sum())  # detached, as torch.tensor(...) in the authors' code
    objective = 80 * loss_sum + cfg.fam.lam * torch.linalg.matrix_norm(w) * trace_sum
    grads = torch.autograd.grad(objective, list(ref.parameters()))
    for p_new, p_old, gr in zip(model.parameters(), ref.parameters(), grads):
        # train_step computes the loss in float32 (logits.float()), hence float32-level agreement
        torch.testing.assert_close(p_new.detach(), p_old.detach() - gr, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lam_data")
    return write_shell_dataset(root)


@pytest.mark.parametrize("method", ["fam", "fam_authors", "baseline"])
def test_metrics_carry_the_gradient_ratio(tiny_root: Path, tmp_path: Path, method: str):
    from skullrec.cli import train_command

    sets = [f"data.root={tiny_root}", "data.max_train_cases=8", "model.size=16", "model.channels=[8, 16, 8]",
            "model.strides=[2, 2, 2]", f"train.method={method}", "train.epochs=2", "train.checkpoint_epochs=[2]",
            "train.num_threads=1", "train.val_every=1", f"fam.lam={0.01 if method != 'baseline' else 0}"]
    train_command(config=REPO / "configs" / "smoke.yaml", overrides=sets, run_dir=tmp_path / "run", resume=None,
                  force=False, device="cpu", overwrite=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        if method == "baseline":
            assert "fam_grad_ratio" not in r
            per_lam = r["monitor_fam_grad_ratio_per_lam"]
            assert set(per_lam) == {"all", "decodeL"} and per_lam["all"] > 0
        else:
            ratio = r["fam_grad_ratio"]
            assert set(ratio) == {"all", "decodeL"} and all(np.isfinite(v) and v > 0 for v in ratio.values())


def test_lambda_scale_lambdas_reproduce_their_ratios():
    model, x, y = _setup(4)
    cfg = config_from_dict({"model": SMALL, "train": {"method": "fam"}, "fam": {"lam": 0.01, "estimator": "outspace"}})
    ls = lambda_scale(model, cfg, x, y, ratios=[0.1], paper_lams=[0.02], seed=5)
    loss_fn = loss_function(cfg.model.loss)
    ours = FamRegularizer(dataclasses.replace(cfg.fam, lam=1.0), model)
    r = grad_ratio(model, x, y, loss_fn, ours, torch.Generator().manual_seed(5), lam=ls.lam_for_ratio[0.1])
    assert r["all"] == pytest.approx(0.1, rel=1e-9)
    # the paper-equivalent lambda gives our objective the ratio the authors' objective has at lambda_p = 0.02
    ours_eq = grad_ratio(model, x, y, loss_fn, ours, torch.Generator().manual_seed(5), lam=ls.lam_equivalent[0.02])
    assert ours_eq["all"] == pytest.approx(0.02 * ls.authors_ratio_per_lam["all"], rel=1e-9)
    # penalty matching: lam * ||W||^2 * Tr == lam_p / 80 * ||W||_F * Tr
    n2 = float(model.decodeL.weight.detach().pow(2).sum())
    assert ls.lam_penalty_match[0.02] * n2 == pytest.approx(0.02 / 80 * n2**0.5, rel=1e-12)
