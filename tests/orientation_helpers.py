"""Volumes stored in another voxel order, built by hand (no nibabel orientation code), for the orientation tests.

Imported as ``from orientation_helpers import store_in_order`` (tests/ is on sys.path like conftest).
"""

from __future__ import annotations

import numpy as np


def store_in_order(data: np.ndarray, affine: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume in another voxel order, computed by hand (no nibabel orientation code).

    File axis a runs along canonical axis perm[a], reversed where flips[a]: canonical index
    i[perm[a]] = j[a] (or n - 1 - j[a]); the file's affine is the canonical one composed with j -> i.
    """
    out = np.transpose(data, perm)
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1.0
    for a, (p, f) in enumerate(zip(perm, flips)):
        if f:
            out = np.flip(out, axis=a)
            index_map[p, a] = -1.0
            index_map[p, 3] = data.shape[p] - 1
        else:
            index_map[p, a] = 1.0
    return np.ascontiguousarray(out), affine @ index_map
