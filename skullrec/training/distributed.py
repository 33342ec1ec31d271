"""Data-parallel training (DistributedDataParallel) helpers for ``torchrun ... -m skullrec train``.

``torchrun --nproc_per_node N -m skullrec train --config C`` starts N processes with the usual
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). :func:`setup` reads it: with
WORLD_SIZE > 1 it joins the process group (NCCL on CUDA, one GPU per process = LOCAL_RANK; gloo on
CPU), otherwise it returns a single-process :class:`DistInfo` and nothing changes.

Semantics (docs/explanation/performance.md):

* ``train.batch_size`` stays the *global* batch: every rank takes its own contiguous 1/N of each
  global batch (:func:`shard`), so a config means the same optimisation for any N. It must be a
  multiple of N. An epoch's last, smaller batch is padded by repeating its first cases up to a
  multiple of N (what torch's DistributedSampler does at the end of an epoch).
* Loss: MONAI ``DiceLoss`` with ``batch=False`` and ``reduction="mean"`` is a mean of per-sample
  Dice losses, and DDP averages gradients over ranks, so with equal shards the update equals the
  single-process update on the combined batch (up to float rounding of the sums).
* FAM: each rank estimates the curvature term on its own shard with the same Hutchinson probes (the
  probe generator is seeded identically on every rank); DDP averages the gradients of
  ``lam * N(w) * T(q_r)``. With ``fam.trace="signed"`` the mean over ranks of the per-shard
  v^T H v equals the combined batch's, so the regulariser is the single-process one; with ``abs`` /
  ``relu`` it is the mean over ranks of |q_r| (>= |mean q_r|, Jensen), a slightly different
  regulariser (identical whenever the shards' estimates share a sign).
* The model is wrapped without ``static_graph=True`` (with the FAM double backward it lets ranks drift
  apart silently) and without ``find_unused_parameters`` (every parameter gets a gradient every step;
  tests/training/test_distributed.py checks that the ranks stay bit-identical).
* Only rank 0 writes (run folder, metrics, checkpoints); the others compute the same validation.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and prints."""
        return self.rank == 0


SINGLE = DistInfo()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def setup(device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (info, this process's device).

    On CUDA each process uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo. Idempotent.
    """
    device = torch.device(device)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE, device
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} GPU(s) on this node (--nproc_per_node too large?)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend), device


def teardown() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    """The DistInfo of an already joined process group (SINGLE when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())


def check_batch_size(batch_size: int, info: DistInfo) -> None:
    """The global batch must split into equal shards."""
    if info.enabled and batch_size % info.world_size:
        raise InputError(f"train.batch_size: {batch_size} is not a multiple of the {info.world_size} processes (the batch is global)")


def wrap(model: nn.Module, info: DistInfo, device: torch.device | None = None) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed (no static graph, no unused-parameter search)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device is not None and device.type == "cuda" else None
    # static_graph=False: the FAM double backward changes the autograd graph between the forward and
    # the reducer's bookkeeping; a static graph silently desynchronises ranks. find_unused_parameters
    # is not needed (the model has no unused parameters) and would cost a graph traversal per step.
    return DDP(model, device_ids=ids, static_graph=False, find_unused_parameters=False)




def shard(index: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous share of one global batch (padded by repetition to a multiple of N)."""
    if not info.enabled:
        return index
    n = index.shape[0]
    per = -(-n // info.world_size)
    if per * info.world_size != n:
        reps = -(-per * info.world_size // n)
        index = index.repeat(reps)[: per * info.world_size]
    return index[info.rank * per : (info.rank + 1) * per]


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy; on the device, no host sync)."""
    if not info.enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def epoch_sums(stacked: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Combine a rank's epoch sums: entry 0 (a sum over samples) is summed over ranks, the others
    (sums over steps of per-step values) are averaged over ranks. One all-reduce, on the device."""
    if not info.enabled:
        return stacked
    out = stacked.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    scale = torch.full_like(out, 1.0 / info.world_size)
    scale[0] = 1.0
    return out * scale


def main_only(fn):  # noqa: ANN001, ANN201 - wraps any writer
    """``fn`` on rank 0, a no-op returning None on the other ranks (run-folder writers)."""
    if current().is_main:
        return fn
    return lambda *args, **kwargs: None


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. before rank 0 reads what it wrote)."""
    if info.enabled:
        dist.barrier()


__all__ = [
    "DistInfo",
    "SINGLE",
    "setup",
    "teardown",
    "current",
    "check_batch_size",
    "wrap",
    "shard",
    "all_reduce_mean",
    "epoch_sums",
    "main_only",
    "barrier",
]
