"""In-memory training data: a data set in the layout of :mod:`skullrec.data.layout`, cached as tensors.

The whole data set is small (100 skulls of 64^3 voxels are 26 MB as uint8), so it is read once and
kept as uint8 tensors on the training device; a batch is an index into that cache, converted to
float32 only when used. No DataLoader workers, no host-to-device copies inside the training step.

Shuffling draws from a :class:`torch.Generator` seeded by ``(seed, epoch)`` alone, so epoch ``e``
sees the same batches whether the run got there in one go or was resumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DataConfig
from ..errors import InputError
from ..utils import derive_seed
from .layout import load_split


def make_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A torch.Generator on ``device`` seeded by :func:`derive_seed` of ``keys``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(derive_seed(*keys))
    return gen


# Purposes of the derived random streams, so that two uses never share one.
STREAM_SHUFFLE = 1
STREAM_PROBES = 2
STREAM_MONITOR = 3


@dataclass
class TensorSplit:
    """One split cached on a device: inputs (defective) and targets (complete), uint8 (N, 1, S, S, S)."""

    name: str
    ids: list[str]
    defective: torch.Tensor
    complete: torch.Tensor
    fingerprint: str = ""  # SHA-256 of ids and voxels: a resumed run checks it trains on the same data

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 (x, y) for the cases at ``index`` (a tensor on the cache's device)."""
        return self.defective[index].float(), self.complete[index].float()

    def subset(self, keep: list[str], name: str) -> "TensorSplit":
        """The cases ``keep`` (ids of this split) as a split of their own, in this split's order."""
        index = [i for i, cid in enumerate(self.ids) if cid in set(keep)]
        d, c = self.defective[index], self.complete[index]
        h = hashlib.sha256("\n".join(self.ids[i] for i in index).encode())
        h.update(d.cpu().numpy().tobytes())
        h.update(c.cpu().numpy().tobytes())
        return TensorSplit(name=name, ids=[self.ids[i] for i in index], defective=d, complete=c, fingerprint=h.hexdigest())

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All cases in order, in batches of ``batch_size`` (evaluation)."""
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            yield self.defective[sl].float(), self.complete[sl].float()


def load_tensor_split(root: str, split: str, size: int, device: torch.device | str, max_cases: int | None = None) -> TensorSplit:
    """Read one split with :func:`skullrec.data.layout.load_split` and cache it on ``device``.

    Raises InputError when the volumes are not ``size``^3 (the model's input edge length).
    """
    s = load_split(root, split, max_cases=max_cases)
    shape = tuple(s.defective.shape[1:])
    if shape != (size,) * 3:
        raise InputError(
            f"{root}/{split}: volumes are {'x'.join(map(str, shape))} but model.size is {size}; "
            f"set model.size or run 'skullrec prepare --size {size}'"
        )
    dev = torch.device(device)
    d_np = np.ascontiguousarray(s.defective, dtype=np.uint8)
    c_np = np.ascontiguousarray(s.complete, dtype=np.uint8)
    h = hashlib.sha256("\n".join(s.ids).encode())
    h.update(d_np.tobytes())
    h.update(c_np.tobytes())
    defective = torch.from_numpy(d_np).unsqueeze(1).to(dev)
    complete = torch.from_numpy(c_np).unsqueeze(1).to(dev)
    return TensorSplit(name=split, ids=list(s.ids), defective=defective, complete=complete, fingerprint=h.hexdigest())


@dataclass
class TrainingData:
    """The training split, the validation split carved from it (or None) and the evaluation splits of one run."""

    train: TensorSplit
    evals: dict[str, TensorSplit]
    val: TensorSplit | None = None

    def epoch_order(self, seed: int, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """The batches (index tensors on the cache's device) of ``epoch``; depends only on (seed, epoch).

        The permutation is drawn on the CPU (the same bytes on every device) and moved once per epoch.
        The last batch is smaller when the split size is not a multiple of ``batch_size``.
        """
        n = len(self.train)
        perm = torch.randperm(n, generator=make_generator("cpu", seed, epoch, STREAM_SHUFFLE))
        perm = perm.to(self.train.defective.device, non_blocking=True)
        return list(torch.split(perm, batch_size))


VAL_SPLIT = "validation"  # the name of the validation split carved from the training cases


def load_training_data(cfg: DataConfig, size: int, device: torch.device | str) -> TrainingData:
    """Load the training split and every evaluation split named in ``cfg`` onto ``device``.

    With ``cfg.val_fraction`` > 0 that share of the training cases becomes the validation split (the seeded
    split rule of ``skullrec prepare``, so it depends only on the ids and ``cfg.val_seed``) and is left out
    of training.
    """
    from .build import split_cases

    train = load_tensor_split(cfg.root, cfg.train_split, size, device, cfg.max_train_cases)
    evals = {name: load_tensor_split(cfg.root, name, size, device, cfg.max_eval_cases) for name in cfg.eval_splits}
    val = None
    if cfg.val_fraction > 0:
        if len(train) < 2:
            raise InputError(f"{cfg.root}/{cfg.train_split}: data.val_fraction needs at least 2 training cases, got {len(train)}")
        keep, val_ids = split_cases(list(train.ids), cfg.val_fraction, cfg.val_seed)
        train, val = train.subset(keep, cfg.train_split), train.subset(val_ids, VAL_SPLIT)
    return TrainingData(train=train, evals=evals, val=val)


__all__ = [
    "make_generator",
    "STREAM_SHUFFLE",
    "STREAM_PROBES",
    "STREAM_MONITOR",
    "TensorSplit",
    "TrainingData",
    "load_tensor_split",
    "load_training_data",
    "VAL_SPLIT",
]
