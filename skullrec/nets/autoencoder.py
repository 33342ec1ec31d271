"""The skull autoencoder: MONAI's ``VarAutoEncoder`` used as a deterministic autoencoder.

Input (B, 1, S, S, S) defective skull in {0, 1}; output (B, C, S, S, S) logits, C set by the loss
(``model.loss``): ``sigmoid_dice`` -> C = 1 (bone logit, ``DiceLoss(sigmoid=True)``), ``softmax_dice``
-> C = 2 (background, bone; ``DiceLoss(to_onehot_y=True, softmax=True)``, the FAM authors' loss).
:func:`bone_logit` turns either into the bone log-odds (reconstruction = bone_logit > 0). With the defaults
(S = 64, channels (20, 40, 80, 160, 8), five stride-2 stages) the bottleneck is 8 channels x 2^3
voxels, so the latent is 8-d and the decoding linear layer ``decodeL`` is 64 x 8 (512 weights):
the layer whose relative flatness FAM regularises.

Differences from ``VarAutoEncoder`` and why:

* deterministic: the latent is the posterior mean ``mu`` (no sampling, no KL term), and the unused
  ``logvar`` layer is removed (DistributedDataParallel rejects parameters that get no gradient);
* logits out (``use_sigmoid=False``): DiceLoss applies the sigmoid itself;
* normalisation ``GroupNorm(C, C, affine=False)`` instead of MONAI's default ``InstanceNorm3d``.
  Both compute the same forward pass, but in torch 2.13 the third-order backward through
  ``InstanceNorm3d`` (needed for the gradient of the FAM term) is silently wrong while GroupNorm's is
  right; tests/nets/test_autoencoder.py and tests/flatness/test_hessian.py check this against finite differences
  (numbers in docs/explanation/fam.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn

from ..config import LIMITS, ModelConfig
from ..errors import ConfigError, short_repr


def _norm_layer(kind: str, channels: int) -> nn.Module:
    """A per-channel normalisation over the spatial axes (what MONAI's instance norm computes)."""
    if kind == "group":
        return nn.GroupNorm(channels, channels, affine=False)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ConfigError(f"model.norm: must be one of group, instance, batch, got {kind!r}")


def _replace_norms(module: nn.Module, kind: str) -> None:
    """Swap every InstanceNorm3d that MONAI built for the chosen normalisation, in place.

    MONAI's ``norm`` argument is one spec for all layers, but GroupNorm(C, C) needs each layer's own
    channel count as its group count, so the layers are replaced after construction.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d):
            setattr(module, name, _norm_layer(kind, child.num_features))
        else:
            _replace_norms(child, kind)


class SkullAutoEncoder(nn.Module):
    """Deterministic 3D convolutional autoencoder built from MONAI's VarAutoEncoder blocks.

    Submodules: ``encoder`` (strided convolutions), ``mu`` (Linear to the latent), ``decodeL``
    (Linear from the latent to the bottleneck features), ``decoder`` (transposed convolutions).
    """

    def __init__(
        self,
        size: int = 64,
        channels: tuple[int, ...] = (20, 40, 80, 160, 8),
        strides: tuple[int, ...] = (2, 2, 2, 2, 2),
        latent_size: int = 8,
        norm: str = "group",
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        vae = VarAutoEncoder(
            spatial_dims=3,
            in_shape=(1, size, size, size),
            out_channels=out_channels,
            latent_size=latent_size,
            channels=tuple(channels),
            strides=tuple(strides),
            norm="instance",  # replaced below
            use_sigmoid=False,
        )
        _replace_norms(vae, norm)
        # Adopt the blocks we use; the VAE's logvar layer is deliberately not kept.
        self.encoder = vae.encode
        self.intermediate = vae.intermediate
        self.mu = vae.mu
        self.decodeL = vae.decodeL
        self.decoder = vae.decode
        self.bottleneck_shape = (int(vae.channels[-1]), *(int(s) for s in vae.final_size))
        self.size = size
        self.latent_size = latent_size
        self.out_channels = out_channels
        if math.prod(int(s) for s in vae.final_size) == 1:  # plain ints: this also runs on torch's meta device
            # Small test sizes (e.g. 32^3 with five stride-2 stages) leave a 1^3 bottleneck. Normalising a
            # single voxel per channel gives exactly 0 (the latent would ignore the input) and torch refuses
            # it for batch size 1, so that one layer goes without normalisation. 64^3 (2^3) is unaffected.
            last = self.encoder[-1]
            if hasattr(last, "adn") and hasattr(last.adn, "N"):
                last.adn.N = nn.Identity()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> latent (B, latent_size): the posterior mean, never a sample."""
        h = self.intermediate(self.encoder(x))
        return self.mu(h.reshape(h.shape[0], -1))

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """Pre-activation bottleneck features z = decodeL(latent), shape (B, F) -> logits (B, 1, S, S, S)."""
        h = F.relu(z).reshape(z.shape[0], *self.bottleneck_shape)
        return self.decoder(h)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_size) -> logits (B, 1, S, S, S)."""
        return self.decode_features(self.decodeL(latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Defective skull (B, 1, S, S, S) -> logits of the complete skull (B, out_channels, S, S, S)."""
        return self.decode(self.encode(x))


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """What defines the network's shapes; a checkpoint stores it to refuse another architecture."""
    return {
        "class": "SkullAutoEncoder",
        "size": int(cfg.size),
        "channels": [int(c) for c in cfg.channels],
        "strides": [int(s) for s in cfg.strides],
        "latent_size": int(cfg.latent_size),
        "norm": str(cfg.norm),
        "out_channels": out_channels(cfg.loss),
    }


def _model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """SkullAutoEncoder's arguments for ``cfg``; ConfigError for shapes it cannot build."""
    if len(cfg.channels) != len(cfg.strides):
        raise ConfigError("model.channels: needs one entry per stride")
    if cfg.size % (2 ** len(cfg.strides)) != 0:
        raise ConfigError(f"model.size: must be divisible by 2**len(strides) = {2 ** len(cfg.strides)}, got {cfg.size}")
    return dict(size=cfg.size, channels=tuple(cfg.channels), strides=tuple(cfg.strides), latent_size=cfg.latent_size, norm=cfg.norm,
                out_channels=out_channels(cfg.loss))


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the state dict of ``build_model(cfg)``, without allocating any.

    The model is built on torch's meta device (shapes only), so a config claiming 10^12 weights costs
    nothing here; :func:`check_parameter_count` and checkpoint loading compare against these shapes.
    """
    with torch.device("meta"):
        model = SkullAutoEncoder(**_model_kwargs(cfg))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_parameter_count(shapes: dict[str, tuple[int, ...]], key: str = "model") -> None:
    """ConfigError ``KEY: N parameters ...`` when the tensors of ``shapes`` hold more than ``LIMITS['parameters']`` values."""
    n = sum(math.prod(shape) for shape in shapes.values())
    if n > LIMITS["parameters"]:
        raise ConfigError(f"{key}: the architecture has {n:,} parameters ({4 * n / 2**30:,.1f} GiB as float32); "
                          f"skullrec builds at most {LIMITS['parameters']:,} (smaller channels, latent_size or size)")


def build_model(cfg: ModelConfig, seed: int | None = None) -> SkullAutoEncoder:
    """The autoencoder described by a ModelConfig.

    The initial weights come from ``seed`` when given (without touching the global RNG state),
    otherwise from torch's global RNG (seed it first). An architecture over ``LIMITS['parameters']``
    is refused (ConfigError) before any weight is allocated.
    """
    kwargs = _model_kwargs(cfg)
    check_parameter_count(state_shapes(cfg))
    if seed is None:
        return SkullAutoEncoder(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SkullAutoEncoder(**kwargs)


LOSSES = ("sigmoid_dice", "softmax_dice")


def out_channels(loss: str) -> int:
    """Output channels the head needs for ``loss``: 1 (bone logit) or 2 (background, bone)."""
    if loss == "sigmoid_dice":
        return 1
    if loss == "softmax_dice":
        return 2
    raise ConfigError(f"model.loss: must be one of {', '.join(LOSSES)}, got {loss!r}")


def loss_function(loss: str | None = None) -> nn.Module:
    """The training loss on logits (MONAI DiceLoss, activation inside: never apply it twice).

    ``None``: the default ``ModelConfig().loss`` (what a model built from default settings outputs).
    Both are means of per-sample losses (``batch=False``, ``reduction="mean"``), which the fast FAM
    estimators and DDP rely on. ``softmax_dice`` averages the Dice losses of the background and bone
    channels (``include_background=True``), as the FAM authors' ``DiceLoss(to_onehot_y=True, softmax=True)``.
    """
    from monai.losses import DiceLoss

    if loss is None:
        loss = ModelConfig().loss
    if out_channels(loss) == 1:
        return DiceLoss(sigmoid=True)
    return DiceLoss(to_onehot_y=True, softmax=True)


def bone_logit(logits: torch.Tensor) -> torch.Tensor:
    """Bone log-odds (B, 1, ...) from either head: the logit itself, or l_bone - l_background.

    softmax over two channels is sigmoid(l_1 - l_0), so ``sigmoid(bone_logit(x))`` is the bone
    probability for both losses and ``bone_logit(x) > 0`` the reconstruction (argmax for softmax).
    """
    if logits.shape[1] == 1:
        return logits
    if logits.shape[1] == 2:
        return logits[:, 1:2] - logits[:, 0:1]
    raise ValueError(f"expected 1 or 2 output channels, got {logits.shape[1]}")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All Linear layers of a model by their module name (e.g. ``{"mu": ..., "decodeL": ...}``)."""
    from ..utils import unwrap

    model = unwrap(model)  # DistributedDataParallel / DataParallel / the trainer's compiled wrapper
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """The Linear layer called ``name``; ConfigError listing the available ones if there is none."""
    layers = linear_layers(model)
    if name not in layers:
        raise ConfigError(f"fam.layers: no Linear layer {short_repr(name)} (available: {', '.join(layers) or 'none'})")
    return layers[name]


__all__ = ["SkullAutoEncoder", "build_model", "state_shapes", "check_parameter_count", "architecture", "linear_layers", "get_linear", "loss_function", "bone_logit", "out_channels", "LOSSES"]
