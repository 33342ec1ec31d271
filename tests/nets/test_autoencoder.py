"""SkullAutoEncoder: sizes, determinism, no unused parameters, GroupNorm == InstanceNorm forward, layer lookup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from skullrec.config import ModelConfig
from skullrec.errors import ConfigError
from skullrec.nets.autoencoder import SkullAutoEncoder, architecture, build_model, get_linear, linear_layers, loss_function

torch.set_num_threads(1)

# Same layer types as the default model, small enough for fast tests; 4 stride-2 stages at 32^3 leave a
# 2^3 bottleneck of 8 channels, so decodeL is 64 x 8 exactly as in the default 64^3 model.
SMALL = ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)


def _input(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, size, generator=g) > 0.7).float()


def test_default_architecture_sizes():
    model = build_model(ModelConfig(), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    # VarAutoEncoder(channels (20,40,80,160,8), 5 stride-2 stages) has 979,634 parameters; minus logvar (64*8 + 8).
    assert n_params == 979_634 - (64 * 8 + 8) == 979_114
    assert tuple(model.decodeL.weight.shape) == (64, 8)
    assert tuple(model.mu.weight.shape) == (8, 64)
    assert model.bottleneck_shape == (8, 2, 2, 2)
    assert not hasattr(model, "logvar")
    assert list(linear_layers(model)) == ["mu", "decodeL"]
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 9 and all(m.num_groups == m.num_channels and not m.affine for m in norms)


def test_forward_is_deterministic_logits_and_composes():
    model = build_model(SMALL, seed=1)
    model.train()  # even in training mode: no sampling of the latent
    x = _input(2, 32, 2)
    out1, out2 = model(x), model(x)
    assert out1.shape == (2, 1, 32, 32, 32)
    assert torch.equal(out1, out2)
    lat = model.encode(x)
    assert lat.shape == (2, 8)
    assert torch.equal(model.decode(lat), out1)
    assert torch.equal(model.decode_features(model.decodeL(lat)), out1)
    assert (out1 < 0).any() and (out1 > 0).any()  # logits, not probabilities


def test_every_parameter_gets_a_gradient():
    """DistributedDataParallel rejects parameters without a gradient (the VAE's logvar was one)."""
    model = build_model(SMALL, seed=3)
    x = _input(2, 32, 4)
    loss_function()(model(x), x).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_groupnorm_computes_the_same_forward_as_instancenorm():
    group = build_model(ModelConfig(**{**SMALL.__dict__, "norm": "group"}), seed=5).double()
    inst = build_model(ModelConfig(**{**SMALL.__dict__, "norm": "instance"}), seed=5).double()
    assert any(isinstance(m, nn.InstanceNorm3d) for m in inst.modules())
    x = _input(3, 32, 6).double()
    torch.testing.assert_close(group(x), inst(x), rtol=1e-10, atol=1e-10)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build_model(SMALL, seed=7), build_model(SMALL, seed=7), build_model(SMALL, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decodeL.weight"], sc["decodeL.weight"])


def test_get_linear_unknown_name_lists_available_layers():
    model = build_model(SMALL, seed=0)
    assert get_linear(model, "decodeL") is model.decodeL
    with pytest.raises(ConfigError, match=r"no Linear layer 'decoder'.*available: mu, decodeL"):
        get_linear(model, "decoder")


def test_architecture_descriptor_and_bad_sizes():
    arch = architecture(SMALL)
    assert arch == {"class": "SkullAutoEncoder", "size": 32, "channels": [4, 8, 16, 8], "strides": [2, 2, 2, 2],
                    "latent_size": 8, "norm": "group"}
    assert architecture(ModelConfig()) != architecture(SMALL)
    with pytest.raises(ConfigError, match="model.size"):
        build_model(ModelConfig(size=48))
    with pytest.raises(ConfigError, match="model.channels"):
        build_model(ModelConfig(channels=[4, 8]))


def test_one_voxel_bottleneck_skips_its_normalisation():
    """At 32^3 with five stride-2 stages the bottleneck is 1^3: normalising one voxel would zero the latent."""
    model = SkullAutoEncoder(size=32, channels=(4, 4, 4, 4, 8), strides=(2,) * 5)
    assert tuple(model.decodeL.weight.shape) == (8, 8)
    assert isinstance(model.encoder[-1].adn.N, nn.Identity)
    x = torch.cat([_input(1, 32, 0), torch.zeros(1, 1, 32, 32, 32)])
    lat = model.encode(x)
    assert not torch.allclose(lat[0], lat[1])  # the latent depends on the input
    assert model(x[:1]).shape == (1, 1, 32, 32, 32)  # batch size 1 works
