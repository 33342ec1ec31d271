"""The Flower ClientApp a site runs: local training with skullrec's own ``train_step``, local evaluation.

What the site receives: the global weights and a config (round, local epochs, the training config as
YAML text). What it sends back: its new weights, its number of training cases, its mean Dice loss and
its held-out DSC. The volumes never leave the site: they are read from the SuperNode's own
``data-root`` (``--node-config "data-root='...' site='...'"``), on the site's machine.

The local update is a few epochs of the training config's method (baseline, FAM, SAM, ASAM,
Lookbehind) from the received weights, run by the trainer's own epoch functions, with a fresh
optimizer each round (the usual FedAvg client) at the learning rate the server sends (the cyclic
schedule of FedSAM + SWA). Its randomness (batch order, Hutchinson probes) comes from (seed, site,
epoch), with the epoch counted across rounds, so a round recomputed after an interruption gives
the same weights, and ``fam.every`` counts steps across rounds as in one ``skullrec train`` run.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch

from ..config import Config, config_from_dict, load_yaml_text
from ..data.cache import TrainingData, load_training_data
from ..errors import ConfigError, InputError
from ..training.trainer import _epoch_record, _torch_settings, _train_epoch, evaluate_dsc, make_run
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
    device: torch.device | str = "cpu", lr: float | None = None,
) -> dict[str, float]:
    """``local_epochs`` epochs of ``cfg.train.method`` on ``data.train``, in place on ``model``; returns the reply metrics.

    The epochs are the trainer's own (:func:`skullrec.training.trainer.make_run`, ``_train_epoch``,
    ``_epoch_record``) numbered across rounds (round r, local epoch e -> epoch (r-1) * local_epochs + e),
    so ``fam.every``, ``sam.start_epoch``, the batch order and the probes continue over the rounds as in
    one ``skullrec train`` run; only the optimizer is fresh each round (the usual FedAvg client).
    ``lr`` replaces ``cfg.train.lr`` for this round (the server's cyclic SWA schedule)."""
    dev = torch.device(device)
    local = dataclasses.replace(cfg, seed=site_seed(cfg, site))  # (seed, site, epoch) drive the local randomness
    with _torch_settings(local, dev):
        run = make_run(local, data, dev, model=model)  # the received global weights, a fresh optimizer
        if lr is not None:
            for group in run.optimizer.param_groups:  # the wrappers (SAM, Lookbehind) share their base's groups
                group["lr"] = lr
        records = []
        for e in range(local_epochs):
            epoch = (round_ - 1) * local_epochs + e + 1
            sums, reg_steps, seconds = _train_epoch(run, epoch)
            records.append(_epoch_record(run, epoch, sums, reg_steps, seconds))
    out = {
        "num-examples": len(data.train),
        "dice_loss": sum(r["dice_loss"] for r in records) / len(records),
        "seconds": sum(r["seconds"] for r in records),
        "reg_steps": sum(r["reg_steps"] for r in records),
        "lr": float(run.optimizer.param_groups[0]["lr"]),
    }
    if records[-1].get("kappa_hat") is not None:  # FAM methods: the last local epoch's flatness terms
        out.update(trace=records[-1]["trace"], kappa_hat=records[-1]["kappa_hat"])
    return out


def local_evaluate(cfg: Config, model: torch.nn.Module, data: TrainingData) -> dict[str, float]:
    """Mean DSC of the global model on each of the site's evaluation splits (``dsc_<split>``)."""
    out: dict[str, float] = {}
    for name, split in data.evals.items():
        out[f"dsc_{name}"] = float(evaluate_dsc(model, split, 2 * cfg.train.batch_size))  # float32, as train's validation and predict
    out["num-examples"] = sum(len(s) for s in data.evals.values())
    return out


def parse_train_config(text: str) -> Config:
    """The training config sent by the server (YAML text), validated like a config file."""
    import yaml

    try:
        # bounded like a config file: a server could send an alias bomb
        return config_from_dict(load_yaml_text(text) or {})
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
        lr = float(conf["lr"]) if "lr" in conf else None
        metrics = local_train(cfg, model, data, round_=int(conf["round"]), local_epochs=int(conf["local-epochs"]), site=site, lr=lr)
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
