"""Stage 2's network: a MONAI UNet from (defective crop, stage-1 prior) to implant logits in a fixed box.

Why UNet (MONAI ``monai.networks.nets.UNet``) rather than SegResNet or DynUNet: the implant has to
meet the defect's rim to within a voxel, and the rim is in the *input* (the defective crop); a UNet's
skip connections carry that fine geometry straight to the output, while the deep path carries the
shape prior. At equal width it is the smallest and fastest of the three on a CPU (no deep
supervision heads as in DynUNet, no residual-block encoder as in SegResNet), which matters for a
recipe that must train on 2 cores. Normalisation is instance norm (batch size 1-2 on a CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from monai.networks.nets import UNet

IN_CHANNELS = 2  # defective skull crop, stage-1 reconstruction crop (the prior)


@dataclass
class ImplantNetConfig:
    """Stage-2 network and its box (all validated by skullrec.training.stage2.validate_stage2)."""

    grid: int = 128  # the box is resampled to grid^3 voxels for the network
    box_mm: float = 128.0  # edge of the cubic box around the defect, in mm
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def architecture(cfg: ImplantNetConfig) -> dict[str, Any]:
    """What must match for two stage-2 checkpoints to be interchangeable."""
    return {"net": "monai.UNet", "in_channels": IN_CHANNELS, "channels": list(cfg.channels), "strides": list(cfg.strides),
            "num_res_units": cfg.num_res_units, "grid": cfg.grid, "box_mm": cfg.box_mm}


def build_implant_net(cfg: ImplantNetConfig, seed: int | None = None) -> torch.nn.Module:
    """The stage-2 UNet (weights from ``seed`` when given, through a local generator state)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _unet(cfg)
    return _unet(cfg)


def _unet(cfg: ImplantNetConfig) -> torch.nn.Module:
    return UNet(spatial_dims=3, in_channels=IN_CHANNELS, out_channels=1, channels=tuple(cfg.channels),
                strides=tuple(cfg.strides), num_res_units=cfg.num_res_units, norm="instance")
