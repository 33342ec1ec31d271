"""The Flower ClientApp a site runs: local training with skullrec's own ``train_step``, local evaluation.

What the site receives: the global weights and a config (round, local epochs, the training config as
YAML text). What it sends back: its new weights, its number of training cases, its mean Dice loss and
its held-out DSC. The volumes never leave the site: they are read from the SuperNode's own
``data-root`` (``--node-config "data-root='...' site='...'"``), on the site's machine.

The local update is a few epochs of the training config's method (baseline, FAM, SAM, ASAM,
Lookbehind) from the received weights, with a fresh optimizer each round (the usual FedAvg client).
Its randomness (batch order, Hutchinson probes) comes from (seed, site, epoch), with the epoch
counted across rounds, so a round recomputed after an interruption gives the same weights.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import torch

from ..config import Config, config_from_dict
from ..data.cache import STREAM_PROBES, TrainingData, load_training_data, make_generator
from ..errors import ConfigError, InputError
from ..training.trainer import SAM_LIKE, _torch_settings, evaluate_dsc, make_optimizer, train_step
from ..utils import derive_seed


def site_seed(cfg: Config, site: str) -> int:
    """The seed of one site's local randomness: (config seed, a stable hash of the site name)."""
    return derive_seed(cfg.seed, zlib.crc32(site.encode()))


def site_config(cfg: Config, data_root: str) -> Config:
    """The training config with the site's own data folder (train split, and eval_site when present)."""
    from .sites import SITE_EVAL
    from pathlib import Path

    values = cfg.to_dict()
    values["data"]["root"] = str(data_root)
    values["data"]["train_split"] = "train"
    values["data"]["eval_splits"] = [SITE_EVAL] if (Path(data_root) / SITE_EVAL / "defective").is_dir() else []
    return config_from_dict(values)


def local_train(
    cfg: Config, model: torch.nn.Module, data: TrainingData, *, round_: int, local_epochs: int, site: str,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``local_epochs`` epochs of ``cfg.train.method`` on ``data.train`` in place; returns the reply metrics."""
    from monai.losses import DiceLoss

    from ..flatness.regularizer import FamRegularizer

    dev = torch.device(device)
    method = cfg.train.method
    optimizer = make_optimizer(cfg, model)
    loss_fn = DiceLoss(sigmoid=True)
    reg = FamRegularizer(cfg.fam, model) if method == "fam" else None
    seed = site_seed(cfg, site)
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    seen, step = 0, 0
    t0 = time.perf_counter()
    with _torch_settings(cfg, dev):
        for e in range(local_epochs):
            epoch = (round_ - 1) * local_epochs + e + 1
            probes = make_generator(dev, seed, epoch, STREAM_PROBES)
            for idx in data.epoch_order(seed, epoch, cfg.train.batch_size):
                x, y = data.train.batch(idx)
                use_reg = reg is not None and step % cfg.fam.every == 0
                out = train_step(
                    model, x, y, loss_fn, optimizer, reg=reg if use_reg else None, lam=cfg.fam.lam,
                    sam=method in SAM_LIKE and epoch >= cfg.sam.start_epoch, generator=probes, amp=cfg.train.amp,
                )
                total += out.loss.to(torch.float64) * x.shape[0]
                seen += x.shape[0]
                step += 1
    return {"num-examples": len(data.train), "dice_loss": float(total) / max(seen, 1), "seconds": time.perf_counter() - t0}


def local_evaluate(cfg: Config, model: torch.nn.Module, data: TrainingData) -> dict[str, float]:
    """Mean DSC of the global model on each of the site's evaluation splits (``dsc_<split>``)."""
    out: dict[str, float] = {}
    for name, split in data.evals.items():
        out[f"dsc_{name}"] = float(evaluate_dsc(model, split, 2 * cfg.train.batch_size, cfg.train.amp))
    out["num-examples"] = sum(len(s) for s in data.evals.values())
    return out


def parse_train_config(text: str) -> Config:
    """The training config sent by the server (YAML text), validated like a config file."""
    import yaml

    try:
        return config_from_dict(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ConfigError) as exc:
        raise InputError(f"train-config from the server: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------
# The Flower app (imported by flwr-clientapp through skullrec/federated/app/pyproject.toml)

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
except ImportError:  # flwr is optional for everything but federated training
    ClientApp = None  # type: ignore[assignment,misc]

if ClientApp is not None:
    app = ClientApp()

    def _setup(msg: Message, context: Context) -> tuple[Config, torch.nn.Module, TrainingData, str, dict[str, Any]]:
        from ..nets.autoencoder import build_model

        site = str(context.node_config.get("site", "site"))
        root = str(context.node_config["data-root"])
        conf = dict(msg.content["config"])
        cfg = site_config(parse_train_config(str(conf["train-config"])), root)
        data = load_training_data(cfg.data, cfg.model.size, "cpu")
        model = build_model(cfg.model, seed=cfg.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return cfg, model, data, site, conf

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Local epochs from the received global weights; reply with the new weights and metrics."""
        cfg, model, data, site, conf = _setup(msg, context)
        metrics = local_train(cfg, model, data, round_=int(conf["round"]), local_epochs=int(conf["local-epochs"]), site=site)
        reply = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site}),
        })
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """DSC of the received global model on the site's held-out cases (eval_site)."""
        cfg, model, data, site, _ = _setup(msg, context)
        metrics = local_evaluate(cfg, model, data)
        reply = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})
        return Message(content=reply, reply_to=msg)
