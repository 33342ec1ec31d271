"""Small helpers every layer uses: the device, the plain module inside a DDP wrapper, seeds, progress.

One seed scheme: every random stream is a :class:`numpy.random.SeedSequence` of integer keys (a case
id enters as its CRC-32), so two purposes never share a stream and a stream never depends on the
order in which work runs. :func:`derive_seed` turns such a sequence into one integer for torch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:  # torch is heavy; only the functions that need it import it
    import torch
    from torch import nn

# A progress callback: called with (done, total) as work advances; total may be None when unknown.
Progress = Callable[[int, "int | None"], None]


def seed_key(key: int | str) -> int:
    """An integer seed key: ints as given, strings (case ids) as their CRC-32."""
    return zlib.crc32(key.encode("utf-8")) if isinstance(key, str) else int(key)


def seed_sequence(*keys: int | str, spawn_key: tuple[int, ...] = ()) -> np.random.SeedSequence:
    """The SeedSequence of ``keys`` (see module doc); ``spawn_key`` selects a child as ``.spawn`` would."""
    entropy = [seed_key(k) for k in keys]
    return np.random.SeedSequence(entropy[0] if len(entropy) == 1 and spawn_key else entropy, spawn_key=spawn_key)


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from integer keys (independent streams per tuple of keys).

    numpy's SeedSequence hashes the whole tuple, so (seed, epoch) and (seed + 1, epoch - 1) give
    unrelated streams, which ``seed * K + epoch`` arithmetic would not guarantee.
    """
    state = seed_sequence(*keys).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Index bounding box of the nonzero voxels: (lo inclusive, hi exclusive) per axis; None for an empty mask."""
    mask = np.asarray(mask)
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    if any(i.size == 0 for i in idx):
        return None
    return tuple(int(i[0]) for i in idx), tuple(int(i[-1]) + 1 for i in idx)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' as given (InputError if unusable)."""
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    return dev


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / a compiled-step wrapper, nested or not (the model itself otherwise)."""
    from torch import nn

    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


__all__ = ["Progress", "bounding_box", "seed_key", "seed_sequence", "derive_seed", "resolve_device", "unwrap"]


def ordered_process_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int, max_workers: int = 4) -> Iterator[Any]:
    """``map(fn, jobs)`` in up to ``min(workers, max_workers)`` spawned processes, results in job order.

    For per-case work on 512^2 x Z skulls (each process holds one, ~1-2 GB, hence the cap); with one
    worker it is the plain in-process map. ``fn`` must be a module-level function (it is pickled).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    n = max(1, min(workers, max_workers, len(jobs)))
    if n == 1:
        yield from map(fn, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))
    try:
        yield from pool.map(fn, jobs)
    finally:
        pool.shutdown(cancel_futures=True)
