"""Stage 2's network: a MONAI UNet from (defective crop, stage-1 prior) to implant logits in a fixed box.

Why UNet (MONAI ``monai.networks.nets.UNet``) rather than SegResNet or DynUNet: the implant has to
meet the defect's rim to within a voxel, and the rim is in the *input* (the defective crop); a UNet's
skip connections carry that fine geometry straight to the output, while the deep path carries the
shape prior. At equal width it is the smallest and fastest of the three on a CPU (no deep
supervision heads as in DynUNet, no residual-block encoder as in SegResNet), which matters for a
recipe that must train on 2 cores. Normalisation is instance norm (batch size 1-2 on a CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import UNet

from ..config import ImplantNetConfig
from .autoencoder import check_parameter_count

IN_CHANNELS = 2  # defective skull crop, stage-1 reconstruction crop (the prior)


def architecture(cfg: ImplantNetConfig) -> dict[str, Any]:
    """What must match for two stage-2 checkpoints to be interchangeable."""
    return {"net": "monai.UNet", "in_channels": IN_CHANNELS, "channels": list(cfg.channels), "strides": list(cfg.strides),
            "num_res_units": cfg.num_res_units, "grid": cfg.grid, "box_mm": cfg.box_mm}


def state_shapes(cfg: ImplantNetConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the state dict of ``build_implant_net(cfg)``, built on torch's meta device (nothing allocated)."""
    with torch.device("meta"):
        model = _unet(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def build_implant_net(cfg: ImplantNetConfig, seed: int | None = None) -> torch.nn.Module:
    """The stage-2 UNet (weights from ``seed`` when given, through a local generator state).

    An architecture over ``LIMITS['parameters']`` is refused (ConfigError naming ``net``) before any weight is allocated.
    """
    check_parameter_count(state_shapes(cfg), key="net")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _unet(cfg)
    return _unet(cfg)


def _unet(cfg: ImplantNetConfig) -> torch.nn.Module:
    return UNet(spatial_dims=3, in_channels=IN_CHANNELS, out_channels=1, channels=tuple(cfg.channels),
                strides=tuple(cfg.strides), num_res_units=cfg.num_res_units, norm="instance")
