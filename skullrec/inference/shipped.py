"""The weights that ship with skullrec (``skullrec/weights/``): stage 1 + stage 2 for ``predict`` and the viewer.

``skullrec/weights/`` is package data, so an installed wheel carries it as well as a checkout. It holds
``stage1.safetensors`` (the 64^3 autoencoder, a
``skullrec train`` checkpoint) and ``stage2.safetensors`` (the implant UNet, a
``skullrec train-implant`` checkpoint), their training configs, and README.md / LICENSE.md
(trained on SkullFix: CC BY-NC-SA 4.0, see there). Both files are read with the safe loaders of
:mod:`skullrec.nets.checkpoint` (safetensors + checksum, never pickle). ``SKULLREC_MODELS=DIR``
points at another folder of the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

MODELS_ENV = "SKULLREC_MODELS"
STAGE1_FILE = "stage1.safetensors"
STAGE2_FILE = "stage2.safetensors"
WEIGHTS_DIR = "weights"


def models_dir() -> Path:
    """The shipped-weights folder: ``$SKULLREC_MODELS`` when set, else ``weights/`` inside the package."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env)
    # Inside the package (not the checkout's top level) so that a wheel installs the weights with the code.
    return Path(__file__).resolve().parents[1] / WEIGHTS_DIR


def shipped_checkpoints() -> tuple[Path, Path]:
    """(stage-1, stage-2) checkpoint files of :func:`models_dir`; InputError naming what is missing."""
    root = models_dir()
    paths = (root / STAGE1_FILE, root / STAGE2_FILE)
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no shipped weights there; pass --checkpoint (and --stage2), or set {MODELS_ENV}")
    return paths
