"""Stage 2's typed config (``skullrec train-implant``, validated on load) and its safe checkpoints.

A checkpoint is safetensors (format :data:`FORMAT`) with the resolved config, the architecture
descriptor of :func:`skullrec.nets.implant_net.architecture` and a SHA-256 of the tensors (the
digest of :mod:`skullrec.nets.checkpoint`); loading never unpickles, and a wrong format, a flipped
byte or another architecture is a one-line InputError.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..config import _from_dict, apply_overrides
from ..errors import ConfigError, InputError
from ..io import atomic_write_bytes, json_default
from .checkpoint import _digest
from .implant_net import ImplantNetConfig, architecture, build_implant_net

FORMAT = "skullrec-implant-checkpoint/1"


@dataclass
class Stage2TrainConfig:
    """Optimisation of stage 2."""

    epochs: int = 20
    batch_size: int = 1
    lr: float = 1e-3
    bce_weight: float = 1.0  # loss = Dice + bce_weight * BCE (Dice alone is flat on an empty prediction)
    checkpoint_epochs: list[int] = field(default_factory=list)
    num_threads: int | None = None


@dataclass
class Stage2Config:
    """A ``skullrec train-implant`` run."""

    data: str = "data/stage2"  # a folder from skullrec prepare-implant
    seed: int = 0
    out: str = "runs/implant"
    net: ImplantNetConfig = field(default_factory=ImplantNetConfig)
    train: Stage2TrainConfig = field(default_factory=Stage2TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_stage2(cfg: Stage2Config) -> Stage2Config:
    """Range checks; ConfigError naming the key."""
    div = 2 ** len(cfg.net.strides)
    checks = [
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("net.grid", cfg.net.grid >= div and cfg.net.grid % div == 0, f"must be a multiple of 2**len(strides) = {div}"),
        ("net.box_mm", cfg.net.box_mm > 0, "must be > 0"),
        ("net.channels", len(cfg.net.channels) == len(cfg.net.strides) + 1, "needs one entry more than strides"),
        ("net.num_res_units", cfg.net.num_res_units >= 0, "must be >= 0"),
        ("train.epochs", cfg.train.epochs >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.bce_weight", cfg.train.bce_weight >= 0, "must be >= 0"),
        ("train.checkpoint_epochs", all(e >= 1 for e in cfg.train.checkpoint_epochs), "epochs must be >= 1"),
        ("train.num_threads", cfg.train.num_threads is None or cfg.train.num_threads >= 1, "must be >= 1"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    return cfg


def stage2_config_from_dict(values: dict[str, Any]) -> Stage2Config:
    """Build and validate a Stage2Config from a mapping (unknown keys and wrong types are ConfigErrors)."""
    return validate_stage2(_from_dict(Stage2Config, values or {}))


def load_stage2_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage2Config:
    """Read a stage-2 YAML config (defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(values, overrides or [])
    try:
        return stage2_config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


# ---------------------------------------------------------------------------------------------- checkpoints

def _arch(cfg: Stage2Config) -> str:
    return json.dumps(architecture(cfg.net), sort_keys=True)


def save_implant_checkpoint(path: str | Path, model: torch.nn.Module, cfg: Stage2Config, **meta: Any) -> Path:
    """Stage-2 weights + config + architecture + checksum as safetensors, written atomically."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "architecture": _arch(cfg),
                "meta": json.dumps(meta, default=json_default), "sha256": _digest(tensors)}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return Path(path)


def load_implant_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Stage2Config, dict[str, Any]]:
    """(model in eval mode, cfg, meta) from a stage-2 checkpoint; one-line InputError for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    payload = path.read_bytes()
    try:
        tensors = st_load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise InputError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not a stage-2 (implant) checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("sha256") != _digest(tensors):
        raise InputError(f"{path}: corrupt checkpoint (tensor data do not match their checksum)")
    try:
        cfg = stage2_config_from_dict(json.loads(metadata["config"]))
        meta = json.loads(metadata.get("meta") or "{}")
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise InputError(f"{path}: checkpoint metadata unreadable ({exc})") from None
    if metadata.get("architecture") != _arch(cfg):
        raise InputError(f"{path}: checkpoint architecture differs from the one this skullrec builds for its config")
    model = build_implant_net(cfg.net)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, meta
