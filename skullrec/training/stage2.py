"""Stage-2 training (``skullrec train-implant``): the implant UNet on samples from ``skullrec prepare-implant``.

The run folder follows ``skullrec train``'s rules (:mod:`skullrec.training.run_dir` names): ``config.yaml``
(the resolved, validated config), ``metrics.jsonl`` (one record per epoch: Dice + BCE loss, training
Dice, seconds), ``ckpt_epochNNN.safetensors`` at ``train.checkpoint_epochs``, ``last.safetensors``,
``state.pt`` (weights, optimizer, epoch; written atomically after every epoch and read with
``torch.load(weights_only=True)``), and the lock file; an existing run folder is refused without
``--overwrite``, and ``--resume RUN`` continues from the last finished epoch. Shuffles come from
``torch.Generator``s seeded by (seed, epoch), so a resumed run equals an uninterrupted one.
Checkpoints: :mod:`skullrec.nets.checkpoint` (``save_implant_checkpoint`` / ``load_implant_checkpoint``) (safetensors + config + architecture + checksum;
loading never unpickles).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import ConfigError, InputError
from ..guards import check_outside_inputs
from ..io import atomic_write_text
from ..config import Stage2Config, load_stage2_config
from ..nets.checkpoint import load_training_state, save_implant_checkpoint, save_training_state
from ..nets.autoencoder import check_parameter_count, loss_function
from ..nets.implant_net import build_implant_net, state_shapes
from ..utils import derive_seed
from .trainer import amp_context
from .run_dir import (
    CONFIG_FILE, LAST, METRICS_FILE, STATE_FILE, check_new_run_dir, check_state_weights, checkpoint_path, clear_run_dir, config_diff,
    describe_diff,
    lock_run_dir, read_metrics, remove_stale_temporaries, write_metrics,
)

# ---------------------------------------------------------------------------------------------- training

def cosine_lr(lr: float, step: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (from 0) of ``total_steps`` under a cosine decay from ``lr`` to 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def init_output_bias(model: torch.nn.Module, fraction: float) -> float:
    """Set the last convolution's bias to the log-odds of the implant's voxel fraction; returns it.

    The implant fills ~3 % of the box, and a fresh UNet says 0.5 everywhere: Adam moves each weight
    by about lr per step, so with lr 1e-3 the output bias alone needs thousands of steps to reach
    log(0.03 / 0.97) = -3.5, and on SkullFix the BCE term sat at ln 2 for the first 135 steps.
    Starting at the prior (the focal-loss paper's initialisation) spends the steps on the shape.
    The last Conv3d of MONAI's UNet is the top residual unit's output convolution, added to an
    identity residual, so its bias shifts every logit.
    """
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    p = min(max(fraction, 1e-4), 1 - 1e-4)
    bias = math.log(p / (1 - p))
    with torch.no_grad():
        convs[-1].bias.fill_(bias)
    return bias


def mirror_samples(x: torch.Tensor, y: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, C, G, G, G) and ``y`` (B, 1, G, G, G) with the samples where ``flip`` (B,) is true mirrored along box axis 0."""
    if not bool(flip.any()):
        return x, y
    f = flip.view(-1, 1, 1, 1, 1)
    # dims 2 of (batch, channel, axis 0, 1, 2): the box's axis 0 (left-right), as predict --mirror
    return torch.where(f, x.flip(2), x), torch.where(f, y.flip(2), y)


def _loss(logits: torch.Tensor, y: torch.Tensor, bce_weight: float, dice_fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    dice = dice_fn(logits, y)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return dice + bce_weight * bce, dice


def _check_resume(run_dir: Path, cfg: Stage2Config, state: dict[str, Any]) -> None:
    """Refuse to resume with a config.yaml that differs from the run's saved state, in one line naming the key.

    ``--resume`` reads the run's own config.yaml, so an edit there is compared with the config saved inside
    state.pt (states written before it was saved: the weights' shapes against the edited architecture).
    """
    from ..config import stage2_config_from_dict

    cfg_file, state_file = run_dir / CONFIG_FILE, run_dir / STATE_FILE
    if isinstance(state.get("config"), dict):
        try:
            held = stage2_config_from_dict(state["config"])
        except ConfigError as exc:
            raise InputError(f"{state_file}: its saved config is invalid for this skullrec version ({exc})") from None
        diff = config_diff(held.to_dict(), cfg.to_dict())
        if diff:
            raise InputError(f"{cfg_file}: the run's saved state ({STATE_FILE}) was trained with another config: {describe_diff(diff)}; "
                             "restore the config or start a new run")
    check_state_weights(state, state_shapes(cfg.net), state_file, f"the network of {cfg_file}")


def train_implant(cfg: Stage2Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                  log: Callable[[str], None] | None = None, stop_after_epoch: int | None = None,
                  inputs: Sequence[str | Path | None] = ()) -> dict[str, Any]:
    """Train stage 2 into ``run_dir`` (or continue it with ``resume``); returns the last epoch record.

    ``stop_after_epoch`` ends the run early after that epoch as an interruption would (tests of resume).
    The run folder may not overlap the samples folder or ``inputs`` (e.g. the config file; :mod:`skullrec.guards`).
    Temporary files torn by an interrupted earlier run are removed (with a warning) once the folder is locked.
    """
    from ..data.stage2 import load_stage2_samples

    run_dir = Path(run_dir)
    if resume:
        cfg_file = run_dir / CONFIG_FILE
        if not cfg_file.is_file():
            raise InputError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); nothing to resume")
        cfg = load_stage2_config(cfg_file)
    check_outside_inputs(run_dir, [cfg.data, *inputs])
    check_parameter_count(state_shapes(cfg.net), "net")  # before anything is written or cleared (meta device: no memory)
    clear = not resume and check_new_run_dir(run_dir, overwrite)
    meta, x, y = load_stage2_samples(cfg.data)  # a data error leaves no run folder behind
    if meta.get("grid") != cfg.net.grid or float(meta.get("box_mm", -1)) != cfg.net.box_mm:
        raise InputError(f"{cfg.data}: samples were cut with box {meta.get('box_mm')} mm / grid {meta.get('grid')}, "
                         f"the config asks for {cfg.net.box_mm} mm / {cfg.net.grid}")
    _lock = lock_run_dir(run_dir)
    if clear:  # holding the lock: a second trainer of this folder was refused above, not cleared under
        clear_run_dir(run_dir)
    remove_stale_temporaries(run_dir)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    model = build_implant_net(cfg.net, seed=derive_seed(cfg.seed, "implant-init"))
    if not resume:
        init_output_bias(model, float(y.mean(dtype=np.float64)))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    start, records = 1, []
    if resume:
        state = load_training_state(run_dir / STATE_FILE)
        _check_resume(run_dir, cfg, state)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        records = read_metrics(run_dir / METRICS_FILE, upto_epoch=start - 1)
    else:
        atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(xt)
    steps_per_epoch = math.ceil(n / cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    record: dict[str, Any] = records[-1] if records else {}
    dice_fn = loss_function("sigmoid_dice")  # stage 2 has one output channel: the implant's logits
    for epoch in range(start, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "implant-epoch", epoch))
        order = torch.randperm(n, generator=gen)
        # Drawn after the order from the same generator, and only with flip on: a run without it keeps its shuffles.
        flips = torch.rand(n, generator=gen) < 0.5 if cfg.train.flip else None
        model.train()
        tot, tot_dice, steps = 0.0, 0.0, 0
        for s in range(0, n, cfg.train.batch_size):
            idx = order[s : s + cfg.train.batch_size]
            if cfg.train.lr_schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(cfg.train.lr, (epoch - 1) * steps_per_epoch + s // cfg.train.batch_size, total_steps)
            xb, yb = xt[idx].float(), yt[idx].float()
            if flips is not None:
                xb, yb = mirror_samples(xb, yb, flips[idx])
            with amp_context(cfg.train.amp, xt.device):
                logits = model(xb)
            loss, dice = _loss(logits.float(), yb, cfg.train.bce_weight, dice_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, tot_dice, steps = tot + float(loss.detach()), tot_dice + float(dice.detach()), steps + 1
        record = {"epoch": epoch, "loss": tot / steps, "dice_loss": tot_dice / steps, "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3), "samples": n}
        if flips is not None:
            record["mirrored"] = int(flips.sum())
        records.append(record)
        write_metrics(run_dir / METRICS_FILE, records)
        save_implant_checkpoint(run_dir / LAST, model, cfg, epoch=epoch, loss=record["loss"])
        if epoch in cfg.train.checkpoint_epochs:
            save_implant_checkpoint(checkpoint_path(run_dir, epoch), model, cfg, epoch=epoch, loss=record["loss"])
        # config: what these weights were trained with, which a resume compares config.yaml with
        save_training_state(run_dir / STATE_FILE, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                                                   "config": cfg.to_dict()})
        if log is not None:
            log(f"epoch {epoch}/{cfg.train.epochs}  loss {record['loss']:.4f}  dice loss {record['dice_loss']:.4f}  {record['seconds']:.1f} s")
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    del _lock
    return record
