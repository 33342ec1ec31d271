"""The loss option ``model.loss: sigmoid_dice | softmax_dice`` through model, checkpoint, training and every consumer.

softmax_dice is the FAM authors' loss: two output channels (background, bone) and
``DiceLoss(to_onehot_y=True, softmax=True)``. Checked here: the loss value against a direct numpy
computation, the bone log-odds helper against softmax, the head's shape, checkpoints recording the loss
(and old ones without the key loading as sigmoid_dice), the fast FAM estimators and the shard average
DDP computes with the softmax loss, and a tiny real training run followed by predict and flatness.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from skullrec.nets import checkpoint as ckpt
from skullrec.flatness import fast as ff
from skullrec.config import Config, FamConfig, ModelConfig, config_from_dict, load_stored_config
from skullrec.errors import ConfigError, InputError
from skullrec.data.layout import write_case
from skullrec.flatness.hessian import rademacher
from skullrec.flatness.regularizer import FamRegularizer
from skullrec.io import Volume
from skullrec.nets.autoencoder import bone_logit, build_model, loss_function
from conftest import seed_of_this_test, shell_pair

SMALL = dict(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)
REPO = Path(__file__).resolve().parents[2]


def _numpy_softmax_dice(logits: np.ndarray, y: np.ndarray) -> float:
    """MONAI's default smoothing (1e-5 numerator and denominator), per sample and channel, then the mean."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    onehot = np.concatenate([1 - y, y], axis=1)
    axes = tuple(range(2, logits.ndim))
    inter = (p * onehot).sum(axes)
    denom = p.sum(axes) + onehot.sum(axes)
    return float((1 - (2 * inter + 1e-5) / (denom + 1e-5)).mean())


def _numpy_sigmoid_dice(logits: np.ndarray, y: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-logits))
    axes = tuple(range(2, logits.ndim))
    return float((1 - (2 * (p * y).sum(axes) + 1e-5) / (p.sum(axes) + y.sum(axes) + 1e-5)).mean())


def test_losses_match_a_direct_numpy_computation():
    seed = seed_of_this_test()
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(3, 1, 6, 6, 6, generator=g) > 0.5).double()
    two = 2 * torch.randn(3, 2, 6, 6, 6, generator=g, dtype=torch.float64)
    one = 2 * torch.randn(3, 1, 6, 6, 6, generator=g, dtype=torch.float64)
    got2 = float(loss_function("softmax_dice")(two, y))
    got1 = float(loss_function("sigmoid_dice")(one, y))
    assert got2 == pytest.approx(_numpy_softmax_dice(two.numpy(), y.numpy()), rel=1e-12), seed
    assert got1 == pytest.approx(_numpy_sigmoid_dice(one.numpy(), y.numpy()), rel=1e-12), seed
    # The two are different functions (the softmax one also scores the background channel).
    assert abs(got2 - float(loss_function("sigmoid_dice")(bone_logit(two), y))) > 1e-3


def test_bone_logit_is_the_softmax_bone_probability():
    g = torch.Generator().manual_seed(1)
    two = torch.randn(2, 2, 5, 5, 5, generator=g, dtype=torch.float64)
    b = bone_logit(two)
    assert b.shape == (2, 1, 5, 5, 5)
    assert torch.allclose(torch.sigmoid(b), torch.softmax(two, dim=1)[:, 1:2], atol=1e-14)
    assert torch.equal((b > 0), (two.argmax(dim=1, keepdim=True) == 1))
    one = torch.randn(2, 1, 5, 5, 5, generator=g)
    assert bone_logit(one) is one
    with pytest.raises(ValueError, match="1 or 2 output channels"):
        bone_logit(torch.zeros(1, 3, 2, 2, 2))


def test_config_key_and_head():
    assert config_from_dict({"model": {"loss": "softmax_dice"}}).model.loss == "softmax_dice"
    with pytest.raises(ConfigError, match="model.loss: must be one of sigmoid_dice, softmax_dice"):
        config_from_dict({"model": {"loss": "dice"}})
    for loss, c in (("sigmoid_dice", 1), ("softmax_dice", 2)):
        model = build_model(ModelConfig(**SMALL, loss=loss), seed=0)
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, c, 32, 32, 32)
        assert model.decodeL.weight.shape == (64, 8)


def _cfg(loss: str) -> Config:
    return config_from_dict({"model": {**SMALL, "loss": loss}})


def test_checkpoint_records_its_loss_and_old_ones_load_as_sigmoid(tmp_path):
    model = build_model(_cfg("softmax_dice").model, seed=0)
    path = ckpt.save_checkpoint(tmp_path / "soft.safetensors", model, _cfg("softmax_dice"), epoch=1)
    loaded, cfg, _ = ckpt.load_checkpoint(path)
    assert cfg.model.loss == "softmax_dice" and loaded.out_channels == 2
    assert json.loads(ckpt.read_checkpoint(path)[2])["out_channels"] == 2

    # A checkpoint written before the key existed: no model.loss in its config, no out_channels in
    # its architecture descriptor, a one-channel head. It must load as sigmoid_dice.
    old_cfg = _cfg("sigmoid_dice")
    old_model = build_model(old_cfg.model, seed=0)
    tensors = {k: v.detach().clone().contiguous() for k, v in old_model.state_dict().items()}
    values = old_cfg.to_dict()
    del values["model"]["loss"]
    arch = json.loads(ckpt.architecture(old_cfg))
    del arch["out_channels"]
    meta = {"format": ckpt.FORMAT, "config": json.dumps(values), "architecture": json.dumps(arch, sort_keys=True),
            "meta": "{}", "sha256": ckpt._digest(tensors)}
    (tmp_path / "old.safetensors").write_bytes(st_save(tensors, metadata=meta))
    m2, cfg2, _ = ckpt.load_checkpoint(tmp_path / "old.safetensors")
    assert cfg2.model.loss == "sigmoid_dice" and m2.out_channels == 1
    x = torch.rand(1, 1, 32, 32, 32)
    assert torch.equal(m2(x), old_model.eval()(x))

    # The same old file claiming softmax in a rewritten config is refused (heads differ), not half-loaded.
    values["model"]["loss"] = "softmax_dice"
    meta["config"] = json.dumps(values)
    (tmp_path / "bad.safetensors").write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(InputError, match="architecture"):
        ckpt.load_checkpoint(tmp_path / "bad.safetensors")


def test_stored_run_config_without_the_key_is_sigmoid(tmp_path):
    values = _cfg("sigmoid_dice").to_dict()
    del values["model"]["loss"]
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    assert load_stored_config(tmp_path / "config.yaml").model.loss == "sigmoid_dice"
    # A new config file without the key gets today's default instead (only stored configs are upgraded).
    assert config_from_dict({}).model.loss == ModelConfig().loss


def _softmax_setup(seed: int):
    model = build_model(ModelConfig(**SMALL, loss="softmax_dice"), seed=seed).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # move off the initial point so all curvature terms are non-trivial
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = (torch.rand(4, 1, 32, 32, 32, generator=gen) > 0.6).double()
    y = ((torch.rand(4, 1, 32, 32, 32, generator=gen) > 0.6) | (x > 0)).double()
    return model, x, y, gen


def test_fast_estimators_with_softmax_dice_match_autograd():
    torch.set_num_threads(1)
    seed = seed_of_this_test()
    model, x, y, gen = _softmax_setup(seed)
    loss_fn = loss_function("softmax_dice")
    probes = rademacher(1, model.decodeL.weight, gen)
    loss = loss_fn(model(x), y)
    (g,) = torch.autograd.grad(loss, model.decodeL.weight, create_graph=True)
    (hv,) = torch.autograd.grad((g * probes[0]).sum(), model.decodeL.weight)
    q_ref = float((hv * probes[0]).sum())
    taps = ff.attach_taps(model)
    logits = model(x)
    q_fd = float(ff.fd_quadratic_form(model, taps, taps.latent, taps.z, logits, y, loss_fn, probes).detach())
    taps.clear()
    latent = model.encode(x)
    z = model.decodeL(latent)
    q_out = float(ff.outspace_quadratic_form(z, latent, loss_fn(model.decode_features(z), y), probes, create_graph=False))
    ff.detach_taps(model)
    assert q_out == pytest.approx(q_ref, rel=1e-9, abs=1e-14), seed
    assert abs(q_fd - q_ref) <= 0.01 * max(abs(q_ref), 0.01), (seed, q_fd, q_ref)


def test_softmax_fd_shards_average_to_the_combined_batch():
    """What DDP computes (mean of the shards' gradients) equals the combined batch, with the softmax loss."""
    torch.set_num_threads(1)
    model, x, y, _ = _softmax_setup(3)
    fam = FamConfig(lam=0.5, estimator="fd", trace="signed")
    reg = FamRegularizer(fam, model)
    loss_fn = loss_function("softmax_dice")

    def grad(idx):
        loss = loss_fn(model(x[idx]), y[idx])
        term = reg(model, x[idx], y[idx], loss_fn, loss, torch.Generator().manual_seed(7))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss + fam.lam * term.penalty, list(model.parameters()))])

    combined = grad(torch.arange(4))
    shards = (grad(torch.arange(2)) + grad(torch.arange(2, 4))) / 2
    assert float((shards - combined).norm() / combined.norm()) <= 1e-9


def test_softmax_training_predict_and_flatness(tmp_path, capsys):
    """A real (tiny) FAM run with softmax_dice: trains, its checkpoint predicts and is measured."""
    from skullrec.cli import flatness_command, train_command
    from skullrec.inference.predict import reconstruct

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, k in (("train", 8), ("eval_set1", 2), ("eval_set2", 2)):
        for i in range(k):
            complete, defective = shell_pair(16, rng)
            write_case(root, split, f"{i:03d}", complete, defective, np.diag([1.5, 1.5, 1.5, 1.0]))
    run = tmp_path / "run"
    sets = [f"data.root={root}", "model.size=16", "model.channels=[8, 16, 8]", "model.strides=[2, 2, 2]",
            "model.loss=softmax_dice", "train.method=fam", "fam.lam=0.001", "train.epochs=4",
            "data.max_train_cases=8",
            "train.checkpoint_epochs=[4]", "train.num_threads=1", "train.lr=0.01"]
    train_command(config=REPO / "configs" / "smoke.yaml", overrides=sets, run_dir=run, resume=None, force=False,
                  device="cpu", overwrite=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(np.isfinite(r["dice_loss"]) and np.isfinite(r["trace"]) for r in records)
    assert records[-1]["dice_loss"] < records[0]["dice_loss"]
    model, cfg, _ = ckpt.load_checkpoint(run / "last.safetensors")
    assert cfg.model.loss == "softmax_dice" and model.out_channels == 2
    complete, defective = shell_pair(16, np.random.default_rng(5))
    vol = Volume(defective.astype(np.uint8), np.diag([1.5, 1.5, 1.5, 1.0]))
    rec = reconstruct(model, [vol], batch_size=1)[0]
    # predict's probability is softmax's bone channel on the prepared grid.
    from skullrec.data.resample import prepare_volume

    prepared = prepare_volume(vol, 16)[0]
    with torch.no_grad():
        logits = model(torch.from_numpy(prepared.data.astype(np.float32))[None, None])
    assert np.allclose(rec.prepared_prob, torch.softmax(logits, 1)[0, 1].numpy(), atol=1e-6)
    capsys.readouterr()
    out = flatness_command(run / "last.safetensors", root, split="train", samples=4, max_cases=2, device="cpu")
    assert np.isfinite(out[0].trace_mean)
    printed = capsys.readouterr().out
    assert "Tr(H)" in printed and "lambda for ratio 0.1:" in printed and "paper lambda 0.02 (authors' objective) = lambda" in printed


@pytest.mark.parametrize("loss", ["sigmoid_dice", "softmax_dice"])
def test_exact_trace_per_sample_equals_the_dense_hessian(loss):
    """||l||^2 Tr(H_z) per sample == the trace of the dense 512 x 512 weight Hessian of that sample's loss."""
    from skullrec.flatness.hessian import exact_trace

    torch.set_num_threads(1)
    model = build_model(ModelConfig(**SMALL, loss=loss), seed=2).double()
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(2, 1, 32, 32, 32, generator=gen) > 0.6).double()
    y = ((torch.rand(2, 1, 32, 32, 32, generator=gen) > 0.6) | (x > 0)).double()
    loss_fn = loss_function(loss)
    got = ff.exact_trace_per_sample(model, x, y, loss_fn)
    ref = torch.stack([exact_trace(loss_fn(model(x[n : n + 1]), y[n : n + 1]), model.decodeL.weight) for n in range(2)])
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-14), (got, ref)
    assert float(ref.abs().min()) > 0
