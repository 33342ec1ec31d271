"""Shared test settings: where the repository and the optional real data (../shared) are.

Tests import these constants (``from conftest import REPO``); pytest puts this folder on sys.path
because tests/ is not a package. Tests on the real data skip themselves when it is absent.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# SkullFix training set (complete_skull/, defective_skull/, implant/ as NRRD), see ../shared/data/real-skulls/SOURCE.md
SKULLFIX_TRAINING = REPO.parent / "shared" / "data" / "real-skulls" / "skullfix-autoimplant2020" / "raw" / "training_set"


def seed_of_this_test() -> int:
    """The running test's seed, from its name and SKULLREC_TEST_SEED (default 0), so CI runs are reproducible.

    Statistical checks (a few standard errors) therefore cannot flake in CI; ``SKULLREC_TEST_SEED=random``
    draws a fresh seed per test from os.urandom to explore other inputs, and failure messages print the seed.
    """
    base = os.environ.get("SKULLREC_TEST_SEED", "0")
    if base == "random":
        return int.from_bytes(os.urandom(4), "little") % 2**31
    name = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    return (int(base) + zlib.crc32(name.encode())) % 2**31


def shell_pair(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A tiny skull stand-in on an n^3 grid: a 2-voxel spherical shell (complete) and it cut by a random plane (defective)."""
    g = np.indices((n, n, n), dtype=np.float64)
    c = (n - 1) / 2 + rng.uniform(-1.5, 1.5, 3)
    r = n * rng.uniform(0.36, 0.44)
    d = np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
    complete = (d < r) & (d > r - 2.0)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return complete, complete & (np.tensordot(axis, g - c[:, None, None, None], axes=1) < 0.6 * r)


def perturbed_model_and_batch(cfg, batch: int, seed: int):
    """A float64 autoencoder of ``cfg`` moved off its initialisation (generic PReLU slopes and weights) and a
    random binary batch: (model, x, y, generator), all from ``seed``."""
    import torch

    from skullrec.nets.autoencoder import build_model

    gen = torch.Generator().manual_seed(seed)
    model = build_model(cfg, seed=seed).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    s = cfg.size
    x = (torch.rand(batch, 1, s, s, s, generator=gen) > 0.6).double()
    y = ((torch.rand(batch, 1, s, s, s, generator=gen) > 0.6) | (x > 0)).double()
    return model, x, y, gen


def write_shell_dataset(root, seed: int = 0, counts=(("train", 8), ("eval_set1", 2), ("eval_set2", 2))):
    """A tiny data set of 16^3 shell pairs (:func:`shell_pair`) in the project's layout, 1.5 mm voxels; returns ``root``."""
    from skullrec.data.layout import write_case

    rng = np.random.default_rng(seed)
    for split, k in counts:
        for i in range(k):
            complete, defective = shell_pair(16, rng)
            write_case(root, split, f"{i:03d}", complete, defective, np.diag([1.5, 1.5, 1.5, 1.0]))
    return root


def linear_model(W: np.ndarray, b: np.ndarray):
    """A float64 ``nn.Linear(3, 2)`` holding the given weight and bias (optimizer tests against numpy)."""
    import torch
    from torch import nn

    m = nn.Linear(3, 2).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(W))
        m.bias.copy_(torch.from_numpy(b))
    return m
