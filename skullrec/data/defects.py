"""Artificial cranial defects on any complete skull -> ``skullrec defects``.

Two families (sizes in mm, so any grid spacing works; pass the spacing):

* **set 1** (training-like, :func:`set1_defect`): a SkullFix-like defect, a cuboid with rounded
  edges cut through the vault at the top-back of the skull. Its size, position and removed
  fraction follow the 100 real SkullFix training defects (measured by
  ``benchmarks/measure_skullfix_defects.py``; numbers in docs/explanation/synthetic-data.md).
* **set 2** (different shape, size and position, :func:`set2_defect`): spheres, ellipsoids,
  unions of balls and noise-perturbed ellipsoids on the frontal, fronto-orbital, temporal,
  parietal, parieto-temporal or occipital bone, on both sides at once ("bilateral") or anywhere
  ("random"), in the spirit of SkullBreak's defect classes.

Geometry is computed in the volume's *index frame in mm* (``index * spacing``) and assumes the
SkullFix array layout: axis 0 towards the patient's left, axis 1 posterior, axis 2 superior
(``skullrec.data.synth`` writes this layout, and :func:`skullrec.io.read_volume` reorients every file to
it, so files in any axis order get their defects at the same anatomical place). Directions are given from the centre of the bone's bounding box as elevation (degrees
above the axial plane) and azimuth (0 = +axis 0 = left, 90 = posterior, 180 = right,
-90 = anterior), like the measurements.

Every defect removes a fraction of the bone voxels inside a documented range
(:data:`SET1_FRACTION`, :data:`SET2_FRACTION`); a draw outside it is first resized, then redrawn,
all from the same generator, so the result is deterministic for a given seed. No library cuts
skull defects, so the shapes are written here (vectorised numpy on the defect's bounding block).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import DefectError
from ..utils import bounding_box

# Removed bone fraction (of the complete skull's bone voxels) every defect must fall in.
# Set 1: the real SkullFix range (min 0.063, 5th-95th percentile 0.065-0.104, max 0.117 over the
# 100 training cases), widened a little. Set 2: SkullBreak-like defects vary more in size.
SET1_FRACTION = (0.055, 0.125)
SET2_FRACTION = (0.03, 0.15)

# Set-1 placement and size, from the SkullFix measurements (see docs/explanation/synthetic-data.md).
SET1_ELEVATION_DEG = (40.0, 54.0)  # real centroid elevation: 35-56, p5-p95 41.6-51.4
SET1_AZIMUTH_DEG = (76.0, 99.0)  # real: 76-99, median 87 (posterior = 90)
SET1_WIDTH_MM = (66.0, 88.0)  # left-right side; real principal extent 67-96, median 80.5
SET1_LENGTH_MM = (52.0, 76.0)  # front-back side; real second extent 44-83, median 67
SET1_EDGE_RADIUS_MM = (8.0, 18.0)
CUT_HALF_DEPTH_MM = 30.0  # cuboid half-depth along the normal: through the whole bone, not into the base

# Set-2 regions: (azimuth range, elevation range) in degrees; "side" regions are mirrored left/right.
SET2_REGIONS: dict[str, dict[str, Any]] = {
    "frontal": {"az": (-115.0, -65.0), "el": (15.0, 40.0)},
    "fronto-orbital": {"az": (-120.0, -60.0), "el": (-12.0, 8.0)},
    "parietal": {"az": (-25.0, 25.0), "el": (35.0, 58.0), "side": True},
    "temporal": {"az": (-35.0, 10.0), "el": (-15.0, 10.0), "side": True},
    "parieto-temporal": {"az": (-25.0, 25.0), "el": (10.0, 35.0), "side": True},
    "occipital": {"az": (65.0, 115.0), "el": (-5.0, 25.0)},
    "bilateral": {"az": (-40.0, 20.0), "el": (15.0, 45.0), "side": True},
    "random": {"az": (-180.0, 180.0), "el": (-10.0, 60.0)},
}
SET2_SHAPES = ("sphere", "ellipsoid", "balls", "noisy_ellipsoid")

MAX_DRAWS = 24  # fresh draws before giving up
MAX_RESIZES = 5  # size adjustments of one draw towards the fraction range



# ---------------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------------


def _bbox_mm(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) bone voxel centre per axis, in mm from the array origin."""
    bb = bounding_box(mask)
    if bb is None:
        raise DefectError("the complete skull has no bone voxels")
    lo = np.array(bb[0], dtype=np.float64)
    hi = np.array(bb[1], dtype=np.float64) - 1.0
    return lo * spacing, hi * spacing


def direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector in the index frame for an azimuth (0 = left, 90 = posterior) and an elevation."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def _ray_bone(mask: np.ndarray, spacing: np.ndarray, start: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Outer and inner surface points (mm) of the outermost bone run along the ray start + t d."""
    extent = np.asarray(mask.shape) * spacing
    step = 0.5 * float(spacing.min())
    t = np.arange(0.0, float(np.linalg.norm(extent)), step)
    pts = start[None, :] + t[:, None] * d[None, :]
    idx = np.rint(pts / spacing).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=1)
    hit = np.zeros(t.size, dtype=bool)
    hit[ok] = mask[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    where = np.flatnonzero(hit)
    if where.size == 0:
        return None
    outer = where[-1]
    gaps = np.flatnonzero(~hit[: outer + 1])
    inner = gaps[-1] + 1 if gaps.size else 0
    return pts[outer], pts[inner]


def _frame(normal: np.ndarray, spin_deg: float) -> np.ndarray:
    """Rows: tangent u (left-right-ish), tangent v (front-back-ish), normal w; spun about w."""
    w = normal / np.linalg.norm(normal)
    ref = np.array([1.0, 0.0, 0.0]) if abs(w[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = ref - (ref @ w) * w
    u /= np.linalg.norm(u)
    v = np.cross(w, u)
    a = math.radians(spin_deg)
    u, v = math.cos(a) * u + math.sin(a) * v, -math.sin(a) * u + math.cos(a) * v
    return np.stack([u, v, w])


def _block(shape: tuple[int, ...], spacing: np.ndarray, centre: np.ndarray, radius: float) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
    """Index slices of the block within ``radius`` mm of ``centre`` and its voxel coordinates (mm, broadcastable)."""
    lo = np.maximum(np.floor((centre - radius) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre + radius) / spacing).astype(int) + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    coords = tuple(
        ((np.arange(a, b) * s) - c).reshape([-1 if ax == k else 1 for k in range(3)]).astype(np.float32)
        for ax, (a, b, s, c) in enumerate(zip(lo, hi, spacing, centre))
    )
    return sl, coords


ShapeFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _cut(complete: np.ndarray, spacing: np.ndarray, parts: list[tuple[np.ndarray, float, ShapeFn]]) -> np.ndarray:
    """Bool mask of the bone removed by a union of shapes; each part: (centre mm, bounding radius mm, fn(dx, dy, dz) -> inside)."""
    removed = np.zeros(complete.shape, dtype=bool)
    for centre, radius, fn in parts:
        blk = _block(complete.shape, spacing, centre, radius)
        if blk is None:
            continue
        sl, (dx, dy, dz) = blk
        removed[sl] |= fn(dx, dy, dz) & complete[sl]
    return removed


def _rounded_box(frame: np.ndarray, half: tuple[float, float, float], edge: float) -> ShapeFn:
    """A cuboid whose four edges along the normal are rounded with radius ``edge`` (a rounded rectangle, extruded)."""
    f = frame.astype(np.float32)
    hu, hv, hw = half
    edge = min(edge, hu, hv)

    def inside(dx, dy, dz):
        pu = np.abs(f[0, 0] * dx + f[0, 1] * dy + f[0, 2] * dz) - (hu - edge)
        pv = np.abs(f[1, 0] * dx + f[1, 1] * dy + f[1, 2] * dz) - (hv - edge)
        pw = np.abs(f[2, 0] * dx + f[2, 1] * dy + f[2, 2] * dz)
        # 2D signed distance of a rounded rectangle in the tangent plane
        d = np.sqrt(np.square(np.maximum(pu, 0)) + np.square(np.maximum(pv, 0))) + np.minimum(np.maximum(pu, pv), 0) - edge
        return (d <= 0) & (pw <= hw)

    return inside


def _ellipsoid(frame: np.ndarray, radii: tuple[float, float, float], coef: np.ndarray | None = None) -> ShapeFn:
    """An oriented ellipsoid; with ``coef`` its radius is perturbed by a smooth low-order polynomial of the direction."""
    f = frame.astype(np.float32)
    r = np.asarray(radii, dtype=np.float32)

    def inside(dx, dy, dz):
        a = (f[0, 0] * dx + f[0, 1] * dy + f[0, 2] * dz) / r[0]
        b = (f[1, 0] * dx + f[1, 1] * dy + f[1, 2] * dz) / r[1]
        c = (f[2, 0] * dx + f[2, 1] * dy + f[2, 2] * dz) / r[2]
        q = np.sqrt(np.square(a) + np.square(b) + np.square(c))
        if coef is None:
            return q <= 1.0
        inv = 1.0 / np.maximum(q, 1e-6)
        a, b, c = a * inv, b * inv, c * inv
        terms = (a, b, c, a * b, b * c, a * c, a * a - b * b, a * b * c)
        bound = 1.0 + sum(np.float32(k) * t for k, t in zip(coef, terms))
        return q <= bound

    return inside


# ---------------------------------------------------------------------------------------------
# drawing with a fraction range
# ---------------------------------------------------------------------------------------------


def _fit_fraction(
    complete: np.ndarray,
    spacing: np.ndarray,
    rng: np.random.Generator,
    draw: Callable[[np.random.Generator, np.ndarray, np.ndarray, float], tuple[list, dict] | None],
    frac_range: tuple[float, float],
    kind: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw defects until one removes a bone fraction inside ``frac_range``.

    ``draw(rng, centre_mm, half_extent_mm, scale)`` returns the shape parts and params; a draw
    whose fraction is out of range is rescaled (same shape, ``scale`` *= sqrt(target / fraction))
    a few times before a fresh draw, so no extra randomness is used per retry.
    """
    total = int(complete.sum())
    if total == 0:
        raise DefectError("the complete skull has no bone voxels")
    lo_mm, hi_mm = _bbox_mm(complete, spacing)
    centre = 0.5 * (lo_mm + hi_mm)
    half = 0.5 * (hi_mm - lo_mm)
    target = math.sqrt(frac_range[0] * frac_range[1])
    best: tuple[float, np.ndarray, dict] | None = None
    for attempt in range(1, MAX_DRAWS + 1):
        state = rng.bit_generator.state  # the same draw is re-evaluated at other scales
        scale = 1.0
        for resize in range(MAX_RESIZES + 1):
            rng.bit_generator.state = state
            got = draw(rng, centre, half, scale)
            if got is None:
                break  # the direction missed the bone (e.g. through an orbit): draw again
            parts, params = got
            removed = _cut(complete, spacing, parts)
            n = int(removed.sum())
            frac = n / total
            if frac_range[0] <= frac <= frac_range[1]:
                defective = complete & ~removed
                params.update(
                    kind=kind, removed_voxels=n, removed_fraction=round(frac, 5), bone_voxels=total,
                    fraction_range=list(frac_range), attempt=attempt, resizes=resize, scale=round(scale, 4),
                )
                return defective, params
            dist = abs(math.log(max(frac, 1e-9) / target))
            if best is None or dist < best[0]:
                best = (dist, removed, params)
            if frac == 0:
                break
            scale *= float(np.clip(math.sqrt(target / frac), 0.6, 1.6))
        # the next draw continues from where this one's random numbers ended
    raise DefectError(
        f"could not cut a {kind} defect removing {frac_range[0]:.0%}-{frac_range[1]:.0%} of the bone "
        f"in {MAX_DRAWS} draws; is this a complete skull in the SkullFix orientation (left, posterior, superior)?"
    )


def _surface_centre(complete, spacing, centre, d) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Mid-thickness point of the outermost bone along direction d, the outward direction there, the thickness."""
    hit = _ray_bone(complete, spacing, centre, d)
    if hit is None:
        return None
    outer, inner = hit
    return 0.5 * (outer + inner), d, float(np.linalg.norm(outer - inner))


def set1_defect(
    complete: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """SkullFix-like defect: a rounded-edge cuboid through the vault at the top-back; returns (defective bool, params)."""
    complete = np.asarray(complete, dtype=bool)
    sp = np.asarray(spacing, dtype=np.float64)

    def draw(rng, centre, half, scale):
        el = rng.uniform(*SET1_ELEVATION_DEG)
        az = rng.uniform(*SET1_AZIMUTH_DEG)
        width = rng.uniform(*SET1_WIDTH_MM)
        length = rng.uniform(*SET1_LENGTH_MM)
        edge = rng.uniform(*SET1_EDGE_RADIUS_MM)
        spin = rng.uniform(-10.0, 10.0)
        hit = _surface_centre(complete, sp, centre, direction(az, el))
        if hit is None:
            return None
        c, d, thick = hit
        frame = _frame(d, spin)
        hu, hv = 0.5 * width * scale, 0.5 * length * scale
        parts = [(c, math.sqrt(hu**2 + hv**2 + CUT_HALF_DEPTH_MM**2), _rounded_box(frame, (hu, hv, CUT_HALF_DEPTH_MM), edge * scale))]
        params = {
            "set": 1, "shape": "rounded_cuboid", "region": "top-back (SkullFix-like)",
            "azimuth_deg": round(az, 2), "elevation_deg": round(el, 2),
            "centre_mm": np.round(c, 2).tolist(), "local_thickness_mm": round(thick, 2),
            "size_mm": [round(2 * hu, 2), round(2 * hv, 2), 2 * CUT_HALF_DEPTH_MM],
            "edge_radius_mm": round(edge * scale, 2), "frame_rows_uvw": np.round(frame, 4).tolist(),
        }
        return parts, params

    return _fit_fraction(complete, sp, rng, draw, SET1_FRACTION, "set1")


def set2_defect(
    complete: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    *,
    region: str | None = None,
    shape: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A defect unlike set 1 (sphere / ellipsoid / balls / noisy ellipsoid in a named region); returns (defective bool, params).

    ``region`` / ``shape`` fix one of :data:`SET2_REGIONS` / :data:`SET2_SHAPES` instead of drawing it.
    """
    complete = np.asarray(complete, dtype=bool)
    sp = np.asarray(spacing, dtype=np.float64)
    if region is not None and region not in SET2_REGIONS:
        raise ValueError(f"unknown set-2 region {region!r} (known: {', '.join(SET2_REGIONS)})")
    if shape is not None and shape not in SET2_SHAPES:
        raise ValueError(f"unknown set-2 shape {shape!r} (known: {', '.join(SET2_SHAPES)})")
    regions = [region] if region is not None else list(SET2_REGIONS)
    shapes = [shape] if shape is not None else list(SET2_SHAPES)

    def one(rng, centre, az, el, shape, scale):
        hit = _surface_centre(complete, sp, centre, direction(az, el))
        if hit is None:
            return None
        c, d, thick = hit
        frame = _frame(d, rng.uniform(-90.0, 90.0))
        info: dict[str, Any] = {"azimuth_deg": round(az, 2), "elevation_deg": round(el, 2), "centre_mm": np.round(c, 2).tolist(), "local_thickness_mm": round(thick, 2)}
        if shape == "sphere":
            r = rng.uniform(32.0, 54.0) * scale
            parts = [(c, r, _ellipsoid(frame, (r, r, r)))]
            info["size_mm"] = [round(2 * r, 2)] * 3
        elif shape in ("ellipsoid", "noisy_ellipsoid"):
            radii = (rng.uniform(40.0, 62.0) * scale, rng.uniform(26.0, 44.0) * scale, rng.uniform(26.0, 44.0) * scale)
            coef = rng.normal(0.0, 0.08, 8) if shape == "noisy_ellipsoid" else None
            bound = max(radii) * (1.0 + (np.abs(coef).sum() if coef is not None else 0.0))
            parts = [(c, bound, _ellipsoid(frame, radii, coef))]
            info["size_mm"] = [round(2 * r, 2) for r in radii]
            if coef is not None:
                info["noise_coef"] = np.round(coef, 4).tolist()
        else:  # a union of a few balls scattered in the tangent plane around c
            k = int(rng.integers(3, 7))
            balls = []
            for _ in range(k):
                off = frame[0] * rng.normal(0, 20.0) + frame[1] * rng.normal(0, 20.0)
                r = rng.uniform(18.0, 32.0) * scale
                balls.append((c + off * scale, r))
            parts = [(bc, r, _ellipsoid(frame, (r, r, r))) for bc, r in balls]
            info["balls_mm"] = [[*np.round(bc, 2).tolist(), round(r, 2)] for bc, r in balls]
            ext = np.array([bc for bc, _ in balls])
            info["size_mm"] = np.round(ext.max(0) - ext.min(0) + 2 * max(r for _, r in balls), 2).tolist()
        info["frame_rows_uvw"] = np.round(frame, 4).tolist()
        return parts, info

    def draw(rng, centre, half, scale):
        region = regions[int(rng.integers(len(regions)))]
        spec = SET2_REGIONS[region]
        shape = shapes[int(rng.integers(len(shapes)))]
        az = rng.uniform(*spec["az"])
        el = rng.uniform(*spec["el"])
        side = "left"
        if spec.get("side"):
            side = "left" if rng.random() < 0.5 else "right"
        sides = ["left", "right"] if region == "bilateral" else [side]
        parts, infos = [], []
        for s in sides:
            a = az if s == "left" else 180.0 - az  # mirror across the mid-sagittal plane
            got = one(rng, centre, a, el, shape, scale * (0.8 if region == "bilateral" else 1.0))
            if got is None:
                return None
            parts += got[0]
            infos.append(got[1])
        params: dict[str, Any] = {"set": 2, "region": region, "shape": shape}
        if spec.get("side") and region != "bilateral":
            params["side"] = side
        params.update(infos[0] if len(infos) == 1 else {"defects": infos})
        return parts, params

    return _fit_fraction(complete, sp, rng, draw, SET2_FRACTION, "set2")
