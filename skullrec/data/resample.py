"""Real skulls of any size and spacing -> cubic ``size^3`` volumes in the same physical space.

Preparation = crop to the bone's bounding box plus a margin (mm), resample the box to
``size^3`` voxels (anisotropic spacing is expected: each axis of the box is divided into ``size``
voxels), binarise with a connectivity-preserving rule, and keep a voxel-to-world affine so that
the prepared voxel centres sit at the right place in RAS millimetres.

Downsampling rule (see docs/how-to/real-data.md for the measurements on all 100 SkullFix skulls):
each prepared voxel gets the exact *partial-volume fraction* of bone inside its footprint
(the source voxels it covers, fractional overlaps weighted), and is bone when that fraction is
``> BONE_FRACTION``. Nearest-neighbour sampling and "fraction >= 0.5" tear SkullFix's thin
skull into many pieces at 64^3; a lower fraction keeps thin bone that crosses a voxel only
partly. The rule is monotone (A subset of B at the source gives A' subset of B'), so a defective
skull stays inside its complete skull after preparation.

The inverse mapping (:func:`restore_to_grid`) brings a prepared-grid probability map back to an
input's own grid by linear interpolation in physical space (used by ``skullrec predict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io import Volume
from ..utils import bounding_box

DEFAULT_SIZE = 64
DEFAULT_MARGIN_MM = 4.0
# A prepared voxel is bone when more than this fraction of its footprint is bone (see module doc).
BONE_FRACTION = 0.25


@dataclass(frozen=True)
class Box:
    """A crop in source voxel indices: ``lo`` inclusive, ``hi`` exclusive, per axis.

    The box may reach past the source volume (a skull touching the border plus its margin);
    voxels outside the volume count as background.
    """

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(h - l) for l, h in zip(self.lo, self.hi))

    def to_dict(self) -> dict[str, list[int]]:
        return {"lo": [int(v) for v in self.lo], "hi": [int(v) for v in self.hi]}


def bone_box(vol: Volume, margin_mm: float = DEFAULT_MARGIN_MM) -> Box:
    """The bounding box of the bone voxels of ``vol`` grown by ``margin_mm`` on every side."""
    bb = bounding_box(vol.data)
    if bb is None:
        raise InputError(f"{vol.path or '<volume>'}: no bone voxels (empty mask)")
    # A margin in mm becomes a whole number of source voxels per axis (spacing differs per axis).
    m = [int(math.ceil(margin_mm / s - 1e-9)) for s in vol.spacing]
    lo = tuple(b - mi for b, mi in zip(bb[0], m))
    hi = tuple(b + mi for b, mi in zip(bb[1], m))
    return Box(lo=lo, hi=hi)


def prepared_affine(source_affine: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Voxel-to-world affine of the ``size^3`` grid that exactly tiles ``box`` of the source grid.

    Prepared voxel ``i`` covers source edge coordinates ``[lo + i*step, lo + (i+1)*step)`` with
    ``step = box.shape / size``; its centre is source index ``lo - 0.5 + (i + 0.5) * step``.
    """
    step = np.asarray(box.shape, dtype=np.float64) / size
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(step)
    index_map[:3, 3] = np.asarray(box.lo, dtype=np.float64) - 0.5 + 0.5 * step
    return np.asarray(source_affine, dtype=np.float64) @ index_map


def _overlap_weights(lo: int, hi: int, dim: int, size: int) -> tuple[np.ndarray, slice]:
    """(size, n_valid) matrix of the fraction of each prepared voxel covered by each source voxel.

    Written by hand because no well-kept library computes exact partial-volume fractions for a
    non-integer shrink factor: SimpleITK's BinShrink and skimage's block_reduce need integer
    factors, torch's adaptive pooling rounds window edges, and skimage's resize smooths with a
    Gaussian instead of measuring the footprint. The 3D fraction is separable, so three small
    matrix products give it exactly.
    """
    n = hi - lo
    step = n / size
    edges = np.arange(size + 1, dtype=np.float64) * step  # prepared voxel edges, in crop coordinates
    j0, j1 = max(lo, 0), min(hi, dim)  # source voxels that exist inside the box
    src = np.arange(j0, j1, dtype=np.float64) - lo
    overlap = np.minimum(edges[1:, None], src[None, :] + 1) - np.maximum(edges[:-1, None], src[None, :])
    return (np.clip(overlap, 0.0, None) / step).astype(np.float32), slice(j0, j1)


def bone_fraction(vol: Volume, box: Box, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Exact partial-volume bone fraction (float32 in [0, 1]) of every voxel of the ``size^3`` grid."""
    weights, slices = zip(*(_overlap_weights(l, h, d, size) for l, h, d in zip(box.lo, box.hi, vol.shape)))
    out = np.zeros((size, size, size), dtype=np.float32)
    if any(s.stop <= s.start for s in slices):
        return out  # the box lies entirely outside the volume
    # Contract one axis at a time (x first, in slabs of 32 source slices: a float32 copy of a
    # whole 512^3 crop would be ~0.5 GB), then y and z on the already small intermediate.
    src = vol.data[slices]
    chunk = 32
    partial = np.zeros((size,) + src.shape[1:], dtype=np.float32)
    if src.flags.f_contiguous or (not src.flags.c_contiguous and src.strides[0] < src.strides[-1]):
        # Laid out like the Fortran path's products below (prepared axis slowest, then z, y fastest), so
        # adding them streams through memory; the tensordots after the loop make their own C-ordered
        # copies, so no sum depends on this layout.
        partial = np.zeros((size, src.shape[2], src.shape[1]), dtype=np.float32).transpose(0, 2, 1)
    for start in range(0, src.shape[0], chunk):
        block = src[start : start + chunk].astype(np.float32)  # keeps src's memory order
        w = weights[0][:, start : start + chunk]
        if block.flags.f_contiguous and not block.flags.c_contiguous:
            # A Fortran-ordered volume (as read from NIfTI / NRRD): the same matrix product on the
            # transposed layout, instead of tensordot's C-ordered copy of every slab. The sums agree with
            # the C-ordered path to float32 rounding: bit for bit where BLAS packs both layouts into the
            # same panels (an Intel AVX-512 machine), up to 1.8e-7 on an AMD EPYC's kernels
            # (tests/inference/test_predict_fast.py, on real skulls).
            n = block.shape[0]
            partial += (w @ block.reshape(n, -1, order="F")).reshape((size,) + block.shape[1:], order="F")
        else:
            partial += np.tensordot(w, block, axes=(1, 0))
    partial = np.tensordot(partial, weights[1], axes=(1, 1))  # (S, Z, S)
    partial = np.tensordot(partial, weights[2], axes=(1, 1))  # (S, S, S)
    np.clip(partial, 0.0, 1.0, out=out)
    return out


def prepare_volume(
    vol: Volume,
    size: int = DEFAULT_SIZE,
    margin_mm: float = DEFAULT_MARGIN_MM,
    box: Box | None = None,
    *,
    fraction: float = BONE_FRACTION,
) -> tuple[Volume, Box]:
    """Crop ``vol`` to its bone box (+ margin, or the given ``box``) and resample to a binary ``size^3`` Volume.

    The result's affine places its voxel centres where they are in the source's physical space;
    ``fraction`` is the partial-volume threshold of the downsampling rule (bone when ``>``).
    """
    if size < 2:
        raise InputError(f"--size: must be >= 2, got {size}")
    if box is None:
        box = bone_box(vol, margin_mm)
    frac = bone_fraction(vol, box, size)
    data = (frac > fraction).astype(np.uint8)
    return Volume(data=data, affine=prepared_affine(vol.affine, box, size), header=None, path=vol.path), box


def prepare_pair(
    complete: Volume,
    defective: Volume,
    size: int = DEFAULT_SIZE,
    margin_mm: float = DEFAULT_MARGIN_MM,
) -> tuple[Volume, Volume]:
    """Prepare a complete / defective pair on one grid whose crop box comes from the DEFECTIVE skull.

    ``predict`` only has the defective skull, so training inputs are framed the same way. The
    defective result is intersected with the complete one (it is already a subset because the
    rule is monotone and the source defective lies inside the complete skull; the AND guards
    against sources where it does not).
    """
    name = defective.path or "<defective>"
    if complete.shape != defective.shape:
        raise InputError(f"{name}: shape {defective.shape} differs from its complete skull {complete.shape}")
    if not np.allclose(complete.affine, defective.affine, atol=1e-3):
        raise InputError(f"{name}: voxel-to-world affine differs from its complete skull's")
    d64, box = prepare_volume(defective, size, margin_mm)
    c64, _ = prepare_volume(complete, size, margin_mm, box=box)
    d64.data &= c64.data
    return c64, d64


def restore_to_grid(
    prob: np.ndarray,
    prepared_affine: np.ndarray,
    target: Volume,
    *,
    cval: float = 0.0,
    fast: bool = True,
) -> np.ndarray:
    """Map a ``size^3`` probability (or logit) map back onto ``target``'s grid (float32, target.shape).

    Linear interpolation at every target voxel centre, located through the two affines
    (physical space), so any target spacing, orientation or tilt works. Target voxels outside
    the prepared grid get ``cval`` (0 for a probability; use a very negative value for logits).
    The caller thresholds. ``fast=False`` always uses scipy's general ``affine_transform`` (the
    reference the separable path for axis-aligned maps is tested against).
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 3:
        raise ValueError(f"restore_to_grid expects a 3D map, got shape {prob.shape}")
    # target index -> prepared index
    m = np.linalg.inv(np.asarray(prepared_affine, dtype=np.float64)) @ np.asarray(target.affine, dtype=np.float64)
    out = np.full(target.shape, cval, dtype=np.float32)
    # Only target voxels whose centres fall inside the prepared grid (+ half a voxel) need
    # interpolating; find their index box from the 8 corners of the prepared grid.
    s = np.asarray(prob.shape, dtype=np.float64)
    corners = np.array([[x, y, z, 1.0] for x in (-0.5, s[0] - 0.5) for y in (-0.5, s[1] - 0.5) for z in (-0.5, s[2] - 0.5)])
    tc = (np.linalg.inv(m) @ corners.T).T[:, :3]
    lo = np.clip(np.floor(tc.min(axis=0)).astype(int) - 1, 0, target.shape)
    hi = np.clip(np.ceil(tc.max(axis=0)).astype(int) + 2, 0, target.shape)
    if np.any(hi <= lo):
        return out
    offset = m[:3, :3] @ lo + m[:3, 3]
    shape = tuple(int(v) for v in hi - lo)
    lin = m[:3, :3]
    # predict's case: the prepared grid is the target grid scaled and shifted per axis (prepared_affine),
    # so lin is diagonal up to the rounding of inv(A) @ A, also for tilted (sheared) files.
    if not fast or np.abs(lin - np.diag(np.diag(lin))).max() > 1e-9 * np.abs(lin).max():
        sub = ndimage.affine_transform(
            prob, lin, offset=offset, output_shape=shape,
            # "grid-constant" blends towards cval beyond the last node instead of cutting to cval there:
            # the result is continuous in position, so the float32 rounding of a file's affine (NIfTI)
            # versus its text (NRRD) or another voxel order cannot flip a whole border slab of voxels.
            order=1, mode="grid-constant", cval=cval, output=np.float32,
        )
    else:
        sub = _separable_linear(prob, np.diag(lin), offset, shape, cval)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = sub
    return out


def _separable_linear(prob: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], cval: float) -> np.ndarray:
    """``ndimage.affine_transform(order=1, mode="grid-constant")`` for a diagonal matrix, as three matrix products.

    Written by hand because scipy's general affine_transform visits every one of the ~60 M target
    voxels of a 512^2 x Z skull with a generic 3-D kernel (about 3 s each call on one core, twice per
    predicted case), while trilinear interpolation along the array axes is separable: one small
    (target x 64) weight matrix per axis, contracted one axis at a time (as bone_fraction does).
    Beyond the input, grid-constant reads cval, i.e. ``cval + interpolate(prob - cval)`` with zeros
    outside, which is what the weights give. tests/data/test_resample.py checks it against scipy.
    """
    w = [_linear_weights(float(scale[i]) * np.arange(shape[i], dtype=np.float64) + float(offset[i]), prob.shape[i]).astype(np.float32)
         for i in range(3)]
    src = prob - np.float32(cval) if cval else prob
    t = np.tensordot(w[0], src, axes=(1, 0))  # (o0, n1, n2)
    t = np.tensordot(t, w[1], axes=(1, 1))  # (o0, n2, o1)
    t = np.tensordot(t, w[2], axes=(1, 1))  # (o0, o1, o2)
    if cval:
        t += np.float32(cval)
    return t.astype(np.float32, copy=False)


def largest_component_fraction(mask: np.ndarray, connectivity: int = 3) -> float:
    """Fraction of the foreground voxels in the largest connected component (1.0 for one piece).

    ``connectivity`` as in scipy.ndimage.generate_binary_structure: 1 = faces (6-neighbourhood),
    3 = faces, edges and corners (26-neighbourhood).
    """
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, connectivity))
    if n == 0:
        return 0.0
    counts = np.bincount(labels.ravel())[1:]
    return float(counts.max() / counts.sum())


# Off-diagonal terms of the target-to-prepared index map below this (per voxel of the target) count as
# zero: inverting the prepared affine leaves ~1e-18 there for an axis-aligned grid, i.e. < 1e-15 voxel.
_AXIS_ALIGNED_TOL = 1e-12


def _linear_weights(coords: np.ndarray, n: int) -> np.ndarray:
    """(len(coords), n) float64 matrix of linear-interpolation weights at ``coords`` on nodes 0..n-1.

    Nodes outside 0..n-1 hold 0 (scipy's ``mode="grid-constant"``, ``cval=0``) and are left out.
    """
    i0 = np.floor(coords)
    t = coords - i0
    i0 = i0.astype(np.int64)
    w = np.zeros((coords.size, n), dtype=np.float64)
    rows = np.arange(coords.size)
    for idx, wt in ((i0, 1.0 - t), (i0 + 1, t)):
        ok = (idx >= 0) & (idx < n)
        w[rows[ok], idx[ok]] = wt[ok]
    return w


def restore_mask(prob: np.ndarray, prepared_affine: np.ndarray, target: Volume, threshold: float = 0.5) -> np.ndarray:
    """``restore_to_grid(prob, prepared_affine, target) > threshold`` (bool, target.shape), fast where the grids are axis-aligned.

    ``prob`` is a probability-like map (values >= 0, outside value 0). A prepared grid is made from its
    target's own grid (:func:`prepared_affine`), so the map between the two is a per-axis scale and shift
    and linear interpolation is separable: three matrix products (BLAS, all cores) instead of scipy's
    8-corner stencil per voxel on one core. Written by hand because no library interpolates separably on
    such a map with scipy's ``grid-constant`` edges: torch's ``interpolate`` clamps at the border and
    computes its coordinates in float32. Only target voxels whose stencil touches a node above
    ``threshold`` are computed (the others are a convex combination of nodes <= threshold, so never above
    it). Like scipy, values are computed in float64 and rounded to float32 before the comparison; they
    may differ from scipy's in the last float64 bit (another summation order), which changes the mask only
    for a voxel lying within ~1e-16 of the threshold. The result is Fortran-ordered, as NIfTI stores
    voxels, so writing it needs no transposition. Other grids (an oblique target) go through
    :func:`restore_to_grid`.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 3:
        raise ValueError(f"restore_mask expects a 3D map, got shape {prob.shape}")
    m = np.linalg.inv(np.asarray(prepared_affine, dtype=np.float64)) @ np.asarray(target.affine, dtype=np.float64)
    lin = m[:3, :3]
    off_diag = np.abs(lin - np.diag(np.diag(lin))).max()
    if off_diag * max(target.shape) > _AXIS_ALIGNED_TOL or threshold < 0:
        return np.asfortranarray(restore_to_grid(prob, prepared_affine, target) > threshold)
    out = np.zeros(target.shape, dtype=bool, order="F")
    above = bounding_box(prob > threshold)
    if above is None:
        return out
    # Per axis: target voxels whose stencil touches a node above the threshold, and the nodes they use.
    # Coordinates as scipy forms them: m @ (target index) + translation, in float64.
    weights, rows, cols = [], [], []
    for ax in range(3):
        idx = np.arange(target.shape[ax], dtype=np.float64)
        w = _linear_weights(lin[ax, ax] * idx + m[ax, 3], prob.shape[ax])
        r = np.flatnonzero(w[:, above[0][ax] : above[1][ax]].any(axis=1))
        if r.size == 0:
            return out
        r = slice(int(r[0]), int(r[-1]) + 1)
        c = np.flatnonzero(w[r].any(axis=0))
        c = slice(int(c[0]), int(c[-1]) + 1)
        weights.append(w[r, c])
        rows.append(r)
        cols.append(c)
    sub = prob[cols[0], cols[1], cols[2]].astype(np.float64)
    wx, wy, wz = weights
    t = np.tensordot(sub, wz, axes=(2, 1))  # (nx, ny, Z)
    t = np.tensordot(t, wy, axes=(1, 1))  # (nx, Z, Y)
    region = out[rows[0], rows[1], rows[2]]  # a view of out, Fortran-ordered: x varies fastest
    above = _float32_above(threshold)
    step = 16  # z slices per matrix product: bounds the float64 block to 16 * Y * X values
    for z0 in range(0, t.shape[1], step):
        part = t[:, z0 : z0 + step, :]
        dz = part.shape[1]
        # (dz * Y, nx) @ (nx, X): rows (z, y), columns x, i.e. exactly the memory order of the region
        block = np.ascontiguousarray(part).reshape(part.shape[0], -1).T @ wx.T
        region[:, :, z0 : z0 + dz] = above(block).reshape(dz, -1, wx.shape[0]).transpose(2, 1, 0)
    return out


def _float32_above(threshold: float):
    """A function ``v -> float32(v) > float32(threshold)`` for float64 ``v``, without making the float32 copy.

    float32(v) > t exactly when v rounds to t's successor or beyond: v above the midpoint m between
    the two, or v == m when round-half-to-even goes up (the successor's last mantissa bit is 0).
    """
    t = np.float32(threshold)
    up = np.nextafter(t, np.float32(np.inf))
    mid = (float(t) + float(up)) / 2  # exact in float64
    if int(np.array(up).view(np.uint32)) & 1 == 0:
        return lambda v: v >= mid
    return lambda v: v > mid
