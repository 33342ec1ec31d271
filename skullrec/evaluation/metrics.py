"""Shape-agreement metrics for binary skulls and implants: DSC, bDSC, HD and HD95 (mm and voxels).

All distances come from MONAI's surface-distance utilities (``monai.metrics.utils.get_mask_edges``
and ``get_surface_distance``), the same primitives behind ``monai.metrics.compute_hausdorff_distance``;
DSC is ``monai.metrics.compute_dice``'s value (computed from counts, see :func:`dice`). What is added here is only what MONAI does not do:

* **Two HD95 definitions** (see docs/reference/metrics.md):
  ``"max"``    - MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed
                 95th percentiles (pred->truth and truth->pred surface distances);
  ``"pooled"`` - AutoImplant's / MedPy's ``hd95``: the 95th percentile of both directed distance sets
                 pooled into one.
  Both are computed from one set of surface distances, so asking for one costs nothing extra; the
  chosen one fills ``hd95_mm`` / ``hd95_vox`` and its name is stored in ``hd95_definition``.
* **bDSC**, AutoImplant 2021's border Dice (see :func:`border_region`).
* **Failed cases.** With an empty prediction or an empty truth MONAI returns inf for HD and NaN for
  HD95, and a NaN-skipping mean then silently drops the case. Here such a case is marked
  ``failed=True`` and gets documented worst values instead: DSC = bDSC = 0 and
  HD = HD95 = the diagonal of the volume (``norm(shape * spacing)`` in mm, ``norm(shape)`` in
  voxels), which is larger than any distance two non-empty masks in that volume can have.

Voxel-unit distances use unit spacing (MONAI's ``spacing=None``); mm distances use the voxel size
from the affine (column norms, :attr:`skullrec.io.Volume.spacing`), i.e. they are exact for any
rotation + per-axis scaling affine (not for sheared grids).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance
from scipy.ndimage import distance_transform_edt
from scipy.spatial import KDTree

from ..utils import bounding_box

HD95Definition = Literal["max", "pooled"]
HD95_DEFINITIONS: tuple[str, ...] = ("max", "pooled")
DEFAULT_HD95: HD95Definition = "max"
TARGETS: tuple[str, ...] = ("skull", "implant")
BORDER_MM = 10.0  # AutoImplant 2021's border width for bDSC

# Keys of a metrics row, in CSV column order (evaluate.py writes them in this order).
METRIC_KEYS: tuple[str, ...] = (
    "dsc", "bdsc", "hd_mm", "hd95_mm", "hd_vox", "hd95_vox", "failed", "failure", "hd95_definition",
)


def _check_hd95(hd95: str) -> str:
    if hd95 not in HD95_DEFINITIONS:
        raise ValueError(f"hd95 must be one of {HD95_DEFINITIONS}, got {hd95!r}")
    return hd95


def _as_bool(a: Any, name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.dtype != np.bool_:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must be binary (0/1 or bool)")
        arr = arr.astype(bool)
    return arr


def worst_distance(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The worst-case distance given to failed cases: the volume's diagonal ``norm(shape * spacing)``."""
    sp = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(shape, dtype=np.float64) * sp))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks, MONAI ``compute_dice``'s value; 0 if both are empty."""
    p, t = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if not t.any() and not p.any():
        # MONAI gives NaN (ignore_empty) or 1 here; for a shape that should exist nothing matched.
        return 0.0
    # compute_dice computes 2 * sum(p * t) / (sum(p) + sum(t)) in float32 on float copies of the
    # masks, which at 512^2 x Z costs seconds per case; the same float32 division of the exact
    # integer counts gives its value bit for bit (sums of 0/1 floats are exact below 2^24 voxels;
    # tests/evaluation/test_fast_fullres.py checks the equality), without the copies.
    inter = np.count_nonzero(p & t)
    total = np.count_nonzero(p) + np.count_nonzero(t)
    return float(np.float32(2 * inter) / np.float32(total))


def _dice_monai(p: np.ndarray, t: np.ndarray) -> float:
    """:func:`dice` the way it was computed before (``compute_dice`` on float copies): the reference of ``full_volume``."""
    if not t.any() and not p.any():
        return 0.0
    value = compute_dice(torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float(),
                         include_background=True, ignore_empty=False)
    return float(value.item())


def border_region(defective: np.ndarray, spacing: Sequence[float], border_mm: float = BORDER_MM) -> np.ndarray:
    """Voxels whose centre lies within ``border_mm`` (Euclidean, mm) of a defective-skull voxel.

    This is AutoImplant 2021's bDSC region: its evaluation takes the distance transform of the
    defective skull's background (``distance_transform_edt(~defective, sampling=spacing)``) and
    keeps voxels with distance <= 10 mm, so the region is the defective skull plus a 10 mm band
    around it, which contains the defect's rim where an implant must fit. scipy's exact EDT is used
    because MONAI has no masked-region helper for this.
    """
    d = _as_bool(defective, "defective")
    if not d.any():
        return np.zeros(d.shape, dtype=bool)
    dist = distance_transform_edt(~d, sampling=tuple(float(s) for s in spacing))
    return dist <= border_mm


def border_dice(
    pred: np.ndarray,
    truth: np.ndarray,
    defective: np.ndarray,
    spacing: Sequence[float],
    target: str = "skull",
    border_mm: float = BORDER_MM,
    pruned: bool = True,
) -> float:
    """AutoImplant's border Dice (bDSC): Dice of the implants restricted to :func:`border_region`.

    For ``target="implant"`` ``pred``/``truth`` are implants and are used as given (as AutoImplant
    does: a predicted implant overlapping the defective skull is penalised). For ``target="skull"``
    they are complete skulls; the implant parts ``pred AND NOT defective`` and
    ``truth AND NOT defective`` are compared, because the defective skull itself lies inside the
    region and would otherwise make every reconstruction score near 1. If neither restricted implant
    has a voxel the value is 0, as in AutoImplant's evaluation (its Dice returns 0 on 0/0).
    """
    p, t, d = _as_bool(pred, "pred"), _as_bool(truth, "truth"), _as_bool(defective, "defective")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "skull":
        p, t = p & ~d, t & ~d
    candidates = p | t
    if not candidates.any() or not d.any():
        return 0.0
    # Only the candidate voxels need their distance to the defective skull. Outside the skull the
    # nearest skull voxel is always one of its surface voxels (a step towards the point along any
    # axis where they differ would be closer), so MONAI's surface distance from the candidates to
    # the skull's edges is exactly the EDT value of border_region, at a fraction of a whole-volume
    # EDT's cost; voxels inside the skull are at distance 0.
    # Skull voxels farther than border_mm from every candidate cannot decide "<= border_mm", so the
    # skull is cut to the candidates' bounding box grown by border_mm (+1 voxel); the cut faces
    # add edge voxels, but those are skull voxels too, so every distance stays exact.
    sp = np.asarray(spacing, dtype=np.float64)
    grow = np.ceil(border_mm / sp).astype(int) + 1
    idx = np.argwhere(candidates)
    lo = np.maximum(idx.min(0) - grow, 0)
    hi = np.minimum(idx.max(0) + grow + 1, candidates.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    near = np.zeros_like(candidates)
    cand_box, d_box = candidates[box], d[box]
    if d_box.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            edges_d, _ = get_mask_edges(d_box, d_box, crop=False)
        # Candidates inside the skull are at distance 0; the others are looked up in a KD-tree of the
        # skull's edge voxels in mm (scipy's, as MONAI's get_surface_distance builds it), with the
        # search cut off just past border_mm: only "<= border_mm" matters, so the pruned search
        # (many times faster on a full-resolution skull) gives the same answer. The distance is
        # compared in float32, as get_surface_distance returns it.
        near_box = cand_box & d_box
        outside = cand_box & ~d_box
        if not pruned:  # the previous computation: MONAI's distance of every candidate (reference)
            dist = np.asarray(get_surface_distance(cand_box, edges_d, spacing=sp.tolist()))
            near_box = np.zeros_like(cand_box)
            near_box[cand_box] = (dist <= border_mm) | d_box[cand_box]
        elif outside.any():
            tree = KDTree(np.argwhere(edges_d).astype(np.float64) * sp, leafsize=32)
            bound = border_mm * (1.0 + 1e-6) + 1e-9
            dist = tree.query(np.argwhere(outside).astype(np.float64) * sp, k=1, distance_upper_bound=bound, workers=-1)[0]
            near_box[outside] = dist.astype(np.float32) <= border_mm
        near[box] = near_box
    p, t = p & near, t & near
    inter = np.count_nonzero(p & t)
    total = np.count_nonzero(p) + np.count_nonzero(t)
    # Plain counting rather than compute_dice: this is the 0/0 -> 0 convention AutoImplant uses.
    return float(2.0 * inter / total) if total else 0.0


def _mask_edges(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        # get_mask_edges warns about a deprecated argument it passes to itself (MONAI 1.6).
        warnings.simplefilter("ignore", FutureWarning)
        return get_mask_edges(p, t, crop=True)


def _directed(
    edges_p: np.ndarray, edges_t: np.ndarray, spacing: Sequence[float] | None, skip_shared: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    sp = None if spacing is None else [float(s) for s in spacing]
    if not skip_shared:  # every surface voxel looked up (the reference, see case_metrics' full_volume)
        d_pt = np.asarray(get_surface_distance(edges_p, edges_t, spacing=sp), dtype=np.float64)
        d_tp = np.asarray(get_surface_distance(edges_t, edges_p, spacing=sp), dtype=np.float64)
        return d_pt, d_tp
    # A surface voxel of one mask that is also a surface voxel of the other is at distance 0, so
    # only the others are looked up in MONAI's KD-tree (the element order of a distance set does
    # not matter for max and percentiles). Where prediction and truth share most of their surface
    # (the intact bone of a skull) this skips most of the work; the values are MONAI's either way.
    shared = edges_p & edges_t
    n_shared = int(np.count_nonzero(shared))

    scale = np.ones(3) if sp is None else np.asarray(sp, dtype=np.float64)

    def one_way(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        rest = src & ~shared
        far = np.empty(0)
        if rest.any():
            # MONAI's get_surface_distance on the CPU (edge coordinates in float64 times the
            # spacing, scipy KDTree, exact nearest distance returned as float32), with the query
            # spread over every core and leaves of 128 points instead of 32: at full resolution a
            # false sheet of implant far from the true one makes these queries most of the run
            # time, and far queries visit fewer nodes with larger leaves (SkullFix 001, 299k sheet
            # voxels against a 52k-voxel implant surface: 3.6 s with 32, 2.4 s with 128, 1 thread).
            # The leaf size changes the search, not the nearest distance it finds.
            tree = KDTree(np.argwhere(dst).astype(np.float64) * scale, leafsize=128)
            far = tree.query(np.argwhere(rest).astype(np.float64) * scale, k=1, workers=-1)[0].astype(np.float32)
        return np.concatenate([np.zeros(n_shared), far.astype(np.float64)])

    return one_way(edges_p, edges_t), one_way(edges_t, edges_p)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred->truth, truth->pred) between two non-empty masks, via MONAI.

    Surfaces are MONAI's edges (``mask XOR binary_erosion(mask)``, 6-connected, the image border
    counts as background); distances are Euclidean between voxel centres, in mm with ``spacing``
    or in voxels with ``spacing=None``.
    """
    p, t = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if not p.any() or not t.any():
        raise ValueError("surface distances need a non-empty pred and truth")
    return _directed(*_mask_edges(p, t), spacing)


def hausdorff_from_distances(d_pt: np.ndarray, d_tp: np.ndarray, hd95: str = DEFAULT_HD95) -> tuple[float, float]:
    """(HD, HD95) from the two directed surface-distance sets, HD95 by the named definition.

    Percentiles use linear interpolation, as both ``torch.quantile`` (MONAI) and ``np.percentile``
    (MedPy/AutoImplant) do by default.
    """
    _check_hd95(hd95)
    hd = max(float(d_pt.max()), float(d_tp.max()))
    if hd95 == "max":
        h95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    else:
        h95 = float(np.percentile(np.concatenate([d_pt, d_tp]), 95))
    return hd, h95


def evaluation_box(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], with_border: bool = True) -> tuple[slice, ...]:
    """The index box inside which :func:`case_metrics` computes everything, with unchanged values.

    The union bounding box of ``pred | truth`` and, for bDSC, grown by the same
    ``ceil(BORDER_MM / spacing) + 1`` voxels :func:`border_dice` grows its own box (defective-skull
    voxels farther out cannot be within ``BORDER_MM`` of a candidate voxel). Inside it: the Dice
    counts are the same (no mask voxel is outside); the surface voxels are the same (the box is
    tight, so a mask voxel on its face has its outer neighbour outside both masks, which MONAI's
    erosion treats like the image border); and so are their Euclidean distances.
    Both masks must not be empty together.
    """
    bb = bounding_box(pred | truth)
    if bb is None:
        raise ValueError("evaluation_box needs a non-empty pred or truth")
    grow = np.zeros(3, dtype=int)
    if with_border:
        grow = np.ceil(BORDER_MM / np.asarray(spacing, dtype=np.float64)).astype(int) + 1
    lo = np.maximum(np.asarray(bb[0]) - grow, 0)
    hi = np.minimum(np.asarray(bb[1]) + grow, pred.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    defective: np.ndarray | None = None,
    hd95: str = DEFAULT_HD95,
    target: str = "skull",
    *,
    full_volume: bool = False,
) -> dict[str, Any]:
    """All metrics of one case: dsc, bdsc, hd_mm, hd95_mm, hd_vox, hd95_vox, failed, failure, hd95_definition.

    Args:
        pred, truth: binary (X, Y, Z) masks on the same grid (bool or 0/1).
        spacing: voxel size in mm along each axis (e.g. ``Volume.spacing``).
        defective: the defective skull on the same grid; without it ``bdsc`` is None.
        hd95: ``"max"`` (MONAI, default) or ``"pooled"`` (AutoImplant/MedPy).
        target: ``"skull"`` (pred/truth are complete skulls) or ``"implant"``; only bDSC depends on it.
        full_volume: the previous computation, step for step: whole arrays, every surface voxel's
            distance looked up, bDSC's search unpruned, Dice by ``compute_dice``. The same values,
            slower at 512^2 x Z.
            Kept as the reference that tests/evaluation/test_fast_fullres.py and
            benchmarks/evaluate_fullres.py compare the default against.

    An empty pred or truth is a failed case (``failed=True``, ``failure`` says which) with the worst
    values documented in the module docstring; it is never NaN.
    """
    _check_hd95(hd95)
    p, t = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred and truth must be 3D arrays of the same shape, got {p.shape} and {t.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing!r}")
    d = None
    if defective is not None:
        d = _as_bool(defective, "defective")
        if d.shape != p.shape:
            raise ValueError(f"defective has shape {d.shape}, pred has {p.shape}")

    empty_p, empty_t = not p.any(), not t.any()
    if empty_p or empty_t:
        failure = "empty prediction and truth" if empty_p and empty_t else ("empty prediction" if empty_p else "empty truth")
        worst_mm, worst_vox = worst_distance(p.shape, spacing), worst_distance(p.shape)
        return {
            "dsc": 0.0, "bdsc": None if d is None else 0.0,
            "hd_mm": worst_mm, "hd95_mm": worst_mm, "hd_vox": worst_vox, "hd95_vox": worst_vox,
            "failed": True, "failure": failure, "hd95_definition": hd95,
        }

    # Every metric is computed inside one box around the two masks (full-resolution skulls are 60 M
    # voxels, the distance transforms dominate): see evaluation_box for why the values are unchanged.
    if not full_volume:
        box = evaluation_box(p, t, spacing, with_border=d is not None)
        p, t = p[box], t[box]
        if d is not None:
            d = d[box]
    edges = _mask_edges(p, t)  # one edge extraction serves mm and voxel distances
    skip = not full_volume
    hd_mm, hd95_mm = hausdorff_from_distances(*_directed(*edges, spacing, skip_shared=skip), hd95=hd95)
    hd_vox, hd95_vox = hausdorff_from_distances(*_directed(*edges, None, skip_shared=skip), hd95=hd95)
    return {
        "dsc": _dice_monai(p, t) if full_volume else dice(p, t),
        "bdsc": None if d is None else border_dice(p, t, d, spacing, target=target, pruned=not full_volume),
        "hd_mm": hd_mm, "hd95_mm": hd95_mm, "hd_vox": hd_vox, "hd95_vox": hd95_vox,
        "failed": False, "failure": "", "hd95_definition": hd95,
    }


def batch_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    spacings: Sequence[Sequence[float]] | np.ndarray,
    defective: np.ndarray | torch.Tensor | None = None,
    hd95: str = DEFAULT_HD95,
    target: str = "skull",
) -> list[dict[str, Any]]:
    """:func:`case_metrics` for N cases stacked as (N, X, Y, Z) (numpy or torch; N spacings or one).

    A plain loop: MONAI's Hausdorff code loops over the batch in Python too and its distances run
    on the CPU (KD-tree), so batching buys nothing; a 64^3 case is fast enough that 100 cases stay
    well inside the 20 s target without worker processes (whose start-up alone costs seconds; the
    measurement, benchmarks/evaluate_speed.py, is in docs/results/performance.md).
    """
    _check_hd95(hd95)
    p = _as_bool(pred, "pred")
    t = _as_bool(truth, "truth")
    if p.ndim != 4 or p.shape != t.shape:
        raise ValueError(f"pred and truth must be (N, X, Y, Z) of the same shape, got {p.shape} and {t.shape}")
    sp = np.asarray(spacings, dtype=np.float64)
    if sp.shape == (3,):
        sp = np.broadcast_to(sp, (len(p), 3))
    if sp.shape != (len(p), 3):
        raise ValueError(f"spacings must be (N, 3) or (3,), got {sp.shape}")
    d = None if defective is None else _as_bool(defective, "defective")
    if d is not None and d.shape != p.shape:
        raise ValueError(f"defective has shape {d.shape}, pred has {p.shape}")
    return [
        case_metrics(p[i], t[i], tuple(float(v) for v in sp[i]), None if d is None else d[i], hd95=hd95, target=target)
        for i in range(len(p))
    ]
