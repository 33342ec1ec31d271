"""A family of named defect kinds in mm, for stage-2 training and an honest "unlike training" score.

SkullFix's own defects and the project's set 1 (:mod:`skullrec.data.defects`) all sit at the top-back
of the skull; real defects come in many kinds (SkullBreak names bilateral, fronto-orbital,
parietotemporal and random ones). Each kind here is a function ``(complete, spacing, rng) ->
(defective, params)`` like :func:`~skullrec.data.defects.set1_defect`, registered in
:data:`DEFECT_KINDS`:

=================== ============================================ =========== =================== ==========
kind                region (azimuth, elevation in degrees)       size mm     crosses the midline removed
=================== ============================================ =========== =================== ==========
``vault-round``     upper vault, any azimuth, elevation 25-88    30-130      may                 0.003-0.25
``vault-irregular`` upper vault, any azimuth, elevation 25-88    30-130      may                 0.003-0.25
``midline``         on the mid-sagittal line, forehead to        40-130      always              0.005-0.25
                    occiput (elevation >= 35 front or back)
``lateral``         one side: temporal / parietal, azimuth       30-130      never (>= 10 mm     0.003-0.20
                    +-55 about left or right, elevation -5-40                away)
``fronto-orbital``  forehead down to the orbital rim,            40-110      may                 0.005-0.20
                    azimuth -90 +- 30, elevation -8-12
``small``           anywhere on the vault and upper forehead,    10-30       may                 0.0001-0.02
                    elevation 15-85 (burr hole to small
                    craniectomy)
``bilateral``       two separate defects, one each side,         30-90 each  never (each >= 10   0.006-0.25
                    azimuth +-45 about left/right, elevation 5-50            mm away)
=================== ============================================ =========== =================== ==========

*Size* is the defect's largest extent (Feret diameter of the removed bone, mm; per piece for
``bilateral``), measured on the result and recorded as ``params["extent_mm"]``; *removed* is the
removed bone fraction of the complete skull's bone voxels. Both are guaranteed (the size to within
one voxel): a cut outside either range, or with the wrong number of pieces, is drawn again (all
from the same generator, so every kind is deterministic for a seed).

How a defect is cut: a direction from the bone's bounding-box centre (azimuth 0 = left, 90 =
posterior, 180 = right, -90 = anterior, as in :mod:`skullrec.data.defects`) meets the outermost bone
at mid-thickness; there an outline is drawn in the tangent plane (an ellipse, an ellipse with its
radius modulated by a few random harmonics, or a union of discs) and extruded along the surface
normal just deep enough to go through the bone under the outline's rim (ray-cast per rim point, at
most :data:`MAX_DEPTH_MM`), so a large defect goes through the curved vault without reaching the
skull base. Bone the extrusion meets away from the defect (a separate fragment) stays. Sizes are
in mm and positions anatomical directions, so any spacing works and any voxel order does once read
into the canonical left, posterior, superior order (:func:`skullrec.io.read_volume`).

The mid-sagittal plane is the plane through the bone's bounding-box centre normal to the
left-right axis (the convention of set 2); ``lateral`` and ``bilateral`` defects stay at least
:data:`MIDLINE_MARGIN_MM` from it on their side (a straight medial edge, as surgeons leave bone over
the superior sagittal sinus), ``midline`` defects are centred on it and reach at least
``MIDLINE_MARGIN_MM`` past it on both sides.

:data:`HELD_OUT_KIND` (``fronto-orbital``) is never used for training by default
(:func:`training_kinds`): no training kind is centred in its region, and their edges seldom reach
it (on a synthetic skull, 30 seeds each: the low forehead, azimuth -90 +- 30 and elevation -20-5,
holds 47 % of the bone a fronto-orbital defect removes and at most 1 % of any training kind's, which
reach it in 0-6 of 30 cases). Its geometry also differs most (the supraorbital rim, the orbital
roof, the face below), so a score on it says how stage 2 does on a defect unlike those it saw. ``bilateral`` was not chosen: its two pieces together span
120-145 mm across the head, as much as stage 2's whole 128 mm box around the implant, so its score
would measure the box, not generalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from ..errors import DefectError
from ..utils import bounding_box
from .defects import _bbox_mm, _fit_fraction, _frame, _ray_bone, _surface_centre, direction, set1_defect, set2_defect

MIDLINE_MARGIN_MM = 10.0  # lateral / bilateral defects keep this far from the mid-sagittal plane
MAX_DEPTH_MM = 55.0  # deepest extrusion under the defect's centre (a 130 mm defect on a tight vault needs ~45)
OUT_DEPTH_MM = 30.0  # extrusion outwards: only air there, but the surface may bend up under the rim
MAX_TRIES = 6  # fresh fraction-fitted cuts before giving up on the size / piece checks
RIM_RAYS = 16  # rays per outline lobe that measure how deep the bone lies under the rim


# ---------------------------------------------------------------------------------------------
# outlines in the tangent plane
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lobe:
    """A star-shaped lobe: an ellipse (semi-axes a along u, b along v, mm) at ``offset``, radius x (1 + sum A_k cos(k t + phi_k))."""

    offset: tuple[float, float]
    a: float
    b: float
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (k, amplitude, phase)

    def radius(self, t: np.ndarray) -> np.ndarray:
        """Boundary distance from the lobe's centre at polar angle ``t`` (radians)."""
        r = self.a * self.b / np.sqrt(np.square(self.b * np.cos(t)) + np.square(self.a * np.sin(t)))
        mod = 1.0 + sum(amp * np.cos(k * t + ph) for k, amp, ph in self.harmonics) if self.harmonics else 1.0
        return r * mod

    def scaled(self, f: float) -> "_Lobe":
        return _Lobe((self.offset[0] * f, self.offset[1] * f), self.a * f, self.b * f, self.harmonics)


@dataclass(frozen=True)
class _Outline:
    """A union of lobes in the tangent plane (u, v) of the defect's frame, in mm."""

    lobes: tuple[_Lobe, ...]

    def boundary(self, n: int = 180) -> np.ndarray:
        """(len(lobes) * n, 2) points on the lobes' boundaries (the union's convex hull is theirs)."""
        t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        pts = [np.stack([lb.offset[0] + lb.radius(t) * np.cos(t), lb.offset[1] + lb.radius(t) * np.sin(t)], 1) for lb in self.lobes]
        return np.concatenate(pts)

    def diameter(self) -> float:
        """Largest extent of the outline (mm)."""
        return float(pdist(self.boundary()).max())

    def reach(self) -> float:
        """Largest distance of the outline from the frame's centre (mm)."""
        return float(np.linalg.norm(self.boundary(), axis=1).max())

    def scaled(self, f: float) -> "_Outline":
        return _Outline(tuple(lb.scaled(f) for lb in self.lobes))

    def scaled_to(self, diameter: float) -> "_Outline":
        return self.scaled(diameter / self.diameter())

    def inside(self, pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(pu.shape, pv.shape), dtype=bool)
        for lb in self.lobes:
            qu, qv = pu - np.float32(lb.offset[0]), pv - np.float32(lb.offset[1])
            out |= np.hypot(qu, qv) <= lb.radius(np.arctan2(qv, qu)).astype(np.float32)
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [{"offset_mm": [round(lb.offset[0], 2), round(lb.offset[1], 2)], "semi_axes_mm": [round(lb.a, 2), round(lb.b, 2)],
                 **({"harmonics": [[k, round(a, 4), round(p, 4)] for k, a, p in lb.harmonics]} if lb.harmonics else {})}
                for lb in self.lobes]


def _ellipse(rng: np.random.Generator, aspect: tuple[float, float]) -> _Outline:
    """A unit ellipse with a random aspect ratio (long axis along u)."""
    return _Outline((_Lobe((0.0, 0.0), 1.0, float(rng.uniform(*aspect))),))


def _wobbly(rng: np.random.Generator) -> _Outline:
    """An ellipse whose radius is modulated by harmonics 2-5 of random phase (amplitudes sum <= 0.45: star-shaped, never pinched off)."""
    amps = rng.uniform(0.03, 0.11, 4)
    harm = tuple((k, float(a), float(rng.uniform(0.0, 2.0 * math.pi))) for k, a in zip(range(2, 6), amps))
    return _Outline((_Lobe((0.0, 0.0), 1.0, float(rng.uniform(0.6, 1.0)), harm),))


def _discs(rng: np.random.Generator) -> _Outline:
    """A union of 3-5 discs around the centre (each overlaps the first, so the union is one piece)."""
    k = int(rng.integers(3, 6))
    lobes = [_Lobe((0.0, 0.0), 1.0, 1.0)]
    for _ in range(k - 1):
        r = float(rng.uniform(0.5, 0.9))
        ang = float(rng.uniform(0.0, 2.0 * math.pi))
        dist = float(rng.uniform(0.4, 0.95)) * (1.0 + r) * 0.8  # < 1 + r: overlaps the central disc
        lobes.append(_Lobe((dist * math.cos(ang), dist * math.sin(ang)), r, r))
    return _Outline(tuple(lobes))


# ---------------------------------------------------------------------------------------------
# one defect piece: an outline extruded along the normal at a surface point
# ---------------------------------------------------------------------------------------------


def _rim(complete: np.ndarray, spacing: np.ndarray, c: np.ndarray, frame: np.ndarray, outline: _Outline, thick: float) -> tuple[float, np.ndarray]:
    """(extrusion depth, rim points) of an outline at ``c``.

    The depth (mm along -normal from ``c``) reaches the inner surface of the outermost bone under the
    outline's rim, + 2 mm, at most :data:`MAX_DEPTH_MM`; the rim points are the outer and inner bone
    surface points met there (mm, no deeper than the extrusion), whose spread is the defect's size.
    """
    t = np.linspace(0.0, 2.0 * math.pi, RIM_RAYS, endpoint=False)
    depth, pts = 0.5 * thick, []
    for lb in outline.lobes:
        r = lb.radius(t)
        for pu, pv in zip(lb.offset[0] + r * np.cos(t), lb.offset[1] + r * np.sin(t)):
            p = c + pu * frame[0] + pv * frame[1]
            # From deep under the rim point outwards: the last bone run met is the vault there.
            hit = _ray_bone(complete, spacing, p - MAX_DEPTH_MM * frame[2], frame[2])
            if hit is not None:
                depth = max(depth, float(-(hit[1] - c) @ frame[2]))
                pts += list(hit)
    depth = min(depth + 2.0, MAX_DEPTH_MM)  # 2 mm: the inner surface's voxels, not just their centres
    rim = np.array(pts).reshape(-1, 3)
    if len(rim):
        below = np.maximum(-(rim - c) @ frame[2] - depth, 0.0)  # how far a point lies under the extrusion's floor
        rim = rim + below[:, None] * frame[2][None, :]
    return depth, rim


def _prism(frame: np.ndarray, outline: _Outline, depth_in: float, depth_out: float,
           half_space: tuple[float, int, float] | None = None) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Shape function (for the cut) of ``outline`` extruded from ``-depth_in`` to ``depth_out`` along the normal.

    ``half_space`` = (x of the part's centre, side, limit), all along axis 0 in mm: keeps only voxels
    with side * (x - limit) >= 0, i.e. one side of a plane parallel to the mid-sagittal one.
    """
    f = frame.astype(np.float32)

    def inside(dx, dy, dz):
        pw = f[2, 0] * dx + f[2, 1] * dy + f[2, 2] * dz
        pu = f[0, 0] * dx + f[0, 1] * dy + f[0, 2] * dz
        pv = f[1, 0] * dx + f[1, 1] * dy + f[1, 2] * dz
        ok = (pw >= -depth_in) & (pw <= depth_out) & outline.inside(pu, pv)
        if half_space is not None:
            cx, side, limit = half_space
            ok &= side * (cx + dx - limit) >= 0  # dx is relative to the part's centre
        return ok

    return inside


def _piece(complete: np.ndarray, spacing: np.ndarray, centre: np.ndarray, d: np.ndarray, spin: float, outline: _Outline,
           max_extent: float, side: int = 0) -> tuple[list, dict[str, Any]] | None:
    """Cut parts and params of one outline at the outermost bone along ``d``; ``side`` +1 / -1 keeps it left / right of the midline margin.

    An outline whose cut would be larger than ``max_extent`` in 3-D (a rim running down a sloping
    wall is longer than its projection) is shrunk to fit first: a continuous change, so the same
    draw gives the same defect at any spacing instead of a redraw at one of them.
    """
    hit = _surface_centre(complete, spacing, centre, d)
    if hit is None:
        return None
    c, _, thick = hit
    frame = _frame(d, spin)
    limit = centre[0] + side * MIDLINE_MARGIN_MM
    for _ in range(3):
        depth_in, rim = _rim(complete, spacing, c, frame, outline, thick)
        if side:
            rim = rim[side * (rim[:, 0] - limit) >= 0]
        extent = feret_diameter(rim)
        if extent <= 0.97 * max_extent:  # 3 % slack: 16 rays per lobe only sample the rim
            break
        outline = outline.scaled(0.95 * max_extent / extent)
    reach = outline.reach()
    fn = _prism(frame, outline, depth_in, OUT_DEPTH_MM, (float(c[0]), side, limit) if side else None)
    info = {
        "centre_mm": np.round(c, 2).tolist(), "local_thickness_mm": round(thick, 2), "outline_diameter_mm": round(outline.diameter(), 2),
        "outline": outline.describe(), "depth_mm": [round(depth_in, 2), OUT_DEPTH_MM], "frame_rows_uvw": np.round(frame, 4).tolist(),
    }
    return [(c, math.hypot(reach, max(depth_in, OUT_DEPTH_MM)), fn)], info


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefectKind:
    """One named kind: where it is, how large (mm, Feret diameter per piece), what bone fraction it removes."""

    name: str
    region: str
    size_mm: tuple[float, float]
    fraction: tuple[float, float]
    midline: str  # "may", "always" or "never" cross the mid-sagittal plane
    pieces: int
    draw: Callable[..., tuple[list, dict[str, Any]] | None]  # (complete, spacing, rng, centre, scale, size) -> parts, params

    def __call__(self, complete: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """Cut this kind of defect: (defective bool array, params)."""
        return _cut_kind(self, complete, spacing, rng)


def _size(rng: np.random.Generator, lo: float, hi: float, scale: float) -> float:
    """A diameter drawn uniformly in [lo, hi], times the fraction fit's scale, kept in [lo, hi]."""
    return float(np.clip(rng.uniform(lo, hi) * scale, lo, hi))


def _angles(az: float, el: float) -> dict[str, float]:
    return {"azimuth_deg": round(az, 2), "elevation_deg": round(el, 2)}


def _draw_vault(shape: str) -> Callable[..., tuple[list, dict[str, Any]] | None]:
    def draw(complete, sp, rng, centre, scale, size):
        az, el = rng.uniform(-180.0, 180.0), rng.uniform(25.0, 88.0)
        kind = shape if shape == "ellipse" else ("wobbly" if rng.random() < 0.5 else "discs")
        outline = {"ellipse": lambda: _ellipse(rng, (0.55, 1.0)), "wobbly": lambda: _wobbly(rng), "discs": lambda: _discs(rng)}[kind]()
        outline = outline.scaled_to(_size(rng, *size, scale))
        got = _piece(complete, sp, centre, direction(az, el), rng.uniform(-90.0, 90.0), outline, size[1])
        return None if got is None else (got[0], {"outline_shape": kind, **_angles(az, el), **got[1]})

    return draw


def _draw_midline(complete, sp, rng, centre, scale, size):
    # pitch in the mid-sagittal plane: 35 = back (posterior, 35 deg up), 90 = vertex, 145 = front
    pitch = rng.uniform(35.0, 145.0)
    d = np.array([0.0, math.cos(math.radians(pitch)), math.sin(math.radians(pitch))])
    width = _size(rng, *size, scale)  # left-right: at least 40 mm, so >= 20 mm each side of the midline
    length = _size(rng, 30.0, size[1], scale)
    outline = _Outline((_Lobe((0.0, 0.0), 0.5 * width, 0.5 * length),))
    # The ray stays in the plane x = centre[0], so the outline is centred on the midline; a small spin keeps it straddling.
    got = _piece(complete, sp, centre, d, rng.uniform(-10.0, 10.0), outline, size[1])
    if got is None:
        return None
    az, el = (90.0, pitch) if pitch <= 90.0 else (-90.0, 180.0 - pitch)
    return got[0], {"outline_shape": "ellipse", **_angles(az, el), "width_mm": round(width, 2), "length_mm": round(length, 2), **got[1]}


def _draw_lateral(complete, sp, rng, centre, scale, size, az_range=(-55.0, 55.0), el_range=(-5.0, 40.0), side=None):
    side = side if side is not None else (1 if rng.random() < 0.5 else -1)
    az, el = rng.uniform(*az_range), rng.uniform(*el_range)
    a = az if side > 0 else 180.0 - az  # mirrored across the mid-sagittal plane for the right side
    shape = "ellipse" if rng.random() < 0.5 else "wobbly"
    outline = (_ellipse(rng, (0.55, 1.0)) if shape == "ellipse" else _wobbly(rng)).scaled_to(_size(rng, *size, scale))
    got = _piece(complete, sp, centre, direction(a, el), rng.uniform(-90.0, 90.0), outline, size[1], side=side)
    if got is None:
        return None
    return got[0], {"side": "left" if side > 0 else "right", "outline_shape": shape, **_angles(a, el), **got[1]}


def _draw_bilateral(complete, sp, rng, centre, scale, size):
    parts, infos = [], []
    for side in (1, -1):  # independent draws, one per side
        got = _draw_lateral(complete, sp, rng, centre, scale, size, az_range=(-45.0, 45.0), el_range=(5.0, 50.0), side=side)
        if got is None:
            return None
        parts += got[0]
        infos.append(got[1])
    return parts, {"defects": infos}


def _draw_fronto_orbital(complete, sp, rng, centre, scale, size):
    az, el = rng.uniform(-120.0, -60.0), rng.uniform(-8.0, 12.0)
    shape = "ellipse" if rng.random() < 0.5 else "wobbly"
    outline = (_ellipse(rng, (0.6, 1.0)) if shape == "ellipse" else _wobbly(rng)).scaled_to(_size(rng, *size, scale))
    got = _piece(complete, sp, centre, direction(az, el), rng.uniform(-30.0, 30.0), outline, size[1])
    return None if got is None else (got[0], {"outline_shape": shape, **_angles(az, el), **got[1]})


def _draw_small(complete, sp, rng, centre, scale, size):
    az, el = rng.uniform(-180.0, 180.0), rng.uniform(15.0, 85.0)
    shape = "ellipse" if rng.random() < 0.7 else "wobbly"  # burr holes are round
    outline = (_ellipse(rng, (0.7, 1.0)) if shape == "ellipse" else _wobbly(rng)).scaled_to(_size(rng, *size, scale))
    got = _piece(complete, sp, centre, direction(az, el), rng.uniform(-90.0, 90.0), outline, size[1])
    return None if got is None else (got[0], {"outline_shape": shape, **_angles(az, el), **got[1]})


def _kind(name, region, size, fraction, midline, draw, pieces=1) -> DefectKind:
    return DefectKind(name, region, size, fraction, midline, pieces, draw)


DEFECT_KINDS: dict[str, DefectKind] = {k.name: k for k in (
    _kind("vault-round", "upper vault, any azimuth, elevation 25-88 deg", (30.0, 130.0), (0.003, 0.25), "may", _draw_vault("ellipse")),
    _kind("vault-irregular", "upper vault, any azimuth, elevation 25-88 deg", (30.0, 130.0), (0.003, 0.25), "may", _draw_vault("irregular")),
    _kind("midline", "mid-sagittal line from the forehead over the vertex to the occiput", (40.0, 130.0), (0.005, 0.25), "always", _draw_midline),
    _kind("lateral", "one side: temporal / parietal, azimuth +-55 about left or right, elevation -5-40 deg", (30.0, 130.0), (0.003, 0.20), "never", _draw_lateral),
    _kind("fronto-orbital", "forehead down to the orbital rim, azimuth -90 +- 30, elevation -8-12 deg", (40.0, 110.0), (0.005, 0.20), "may", _draw_fronto_orbital),
    _kind("small", "vault and upper forehead, any azimuth, elevation 15-85 deg", (10.0, 30.0), (0.0001, 0.02), "may", _draw_small),
    _kind("bilateral", "both sides: parietotemporal, azimuth +-45 about left and right, elevation 5-50 deg", (30.0, 90.0), (0.006, 0.25), "never", _draw_bilateral, pieces=2),
)}

HELD_OUT_KIND = "fronto-orbital"  # see the module docstring for why this one


def training_kinds() -> tuple[str, ...]:
    """The kinds of :data:`DEFECT_KINDS` stage 2 trains on: all but :data:`HELD_OUT_KIND`."""
    return tuple(k for k in DEFECT_KINDS if k != HELD_OUT_KIND)


def defect_generator(kind: str) -> Callable[[np.ndarray, tuple[float, float, float], np.random.Generator], tuple[np.ndarray, dict[str, Any]]]:
    """The defect function of a kind name: ``set1``, ``set2`` or one of :data:`DEFECT_KINDS` (KeyError otherwise)."""
    if kind == "set1":
        return set1_defect
    if kind == "set2":
        return set2_defect
    return DEFECT_KINDS[kind]


# ---------------------------------------------------------------------------------------------
# cutting with the size, piece and midline checks
# ---------------------------------------------------------------------------------------------


def feret_diameter(points_mm: np.ndarray) -> float:
    """Largest distance between two of the (N, 3) points (mm): over the convex hull's vertices when there are many."""
    pts = np.asarray(points_mm, dtype=np.float64)
    if len(pts) < 2:
        return 0.0
    if len(pts) > 2000:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # flat point sets (a one-voxel-thick patch): qhull refuses them, all points then
            pass
    return float(pdist(pts).max())


def _pieces(removed: np.ndarray) -> tuple[np.ndarray, int, tuple[slice, ...]]:
    """26-connected labels of the removed bone inside its bounding box: (labels, count, the box's slices)."""
    bb = bounding_box(removed)
    sl = tuple(slice(a, b) for a, b in zip(*bb))
    labels, n = ndimage.label(removed[sl], structure=np.ones((3, 3, 3), bool))
    return labels, n, sl


def _cut_kind(kind: DefectKind, complete: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Fraction-fitted cuts of ``kind`` (defects._fit_fraction) until one passes the piece, size and midline checks."""
    complete = np.asarray(complete, dtype=bool)
    sp = np.asarray(spacing, dtype=np.float64)
    total = int(complete.sum())
    if total == 0:
        raise DefectError("the complete skull has no bone voxels")
    lo_mm, hi_mm = _bbox_mm(complete, sp)
    x_mid = 0.5 * (lo_mm[0] + hi_mm[0])
    voxel = float(sp.mean())

    def draw(rng, centre, half, scale):
        return kind.draw(complete, sp, rng, centre, scale, kind.size_mm)

    problem = ""
    for attempt in range(1, MAX_TRIES + 1):
        defective, params = _fit_fraction(complete, sp, rng, draw, kind.fraction, kind.name)
        removed = complete & ~defective
        labels, n, sl = _pieces(removed)
        # Keep the defect itself: its largest piece (per side for bilateral); fragments the extrusion
        # met elsewhere (a zygomatic arch, a ridge of the skull base) go back into the skull.
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable") + 1
        if kind.pieces == 1:
            keep = [int(order[0])]
        else:
            com = ndimage.center_of_mass(np.ones_like(labels), labels, order)
            xs = [(sl[0].start + c[0]) * sp[0] for c in com]
            keep = [next((int(lab) for lab, x in zip(order, xs) if s * (x - x_mid) > 0), -1) for s in (1, -1)]
        if -1 in keep:
            problem = "no piece on one side"
            continue
        kept = np.isin(labels, keep)
        extents, sides = [], []
        for lab in keep:
            pts = (np.argwhere(labels == lab) + [s.start for s in sl]) * sp
            extents.append(round(feret_diameter(pts) + voxel, 2))  # + one voxel: centres to voxel edges
            sides.append((float(pts[:, 0].min() - x_mid), float(pts[:, 0].max() - x_mid)))
        n_removed = int(kept.sum())
        frac = n_removed / total
        if not kind.fraction[0] <= frac <= kind.fraction[1]:
            problem = f"removed fraction {frac:.4f} after dropping fragments"
        elif any(not kind.size_mm[0] - voxel <= e <= kind.size_mm[1] + voxel for e in extents):
            problem = f"extent {extents} mm"
        elif kind.midline == "always" and not (sides[0][0] <= -MIDLINE_MARGIN_MM and sides[0][1] >= MIDLINE_MARGIN_MM):
            problem = "does not straddle the midline"
        else:
            full = np.zeros_like(complete)
            full[sl] = kept
            params.update(
                removed_voxels=n_removed, removed_fraction=round(frac, 5), extent_mm=extents, pieces=len(keep),
                fragments_kept_in_skull=int(n - len(keep)), midline_x_mm=round(x_mid, 2),
                midline_distance_mm=[[round(a, 2), round(b, 2)] for a, b in sides], size_range_mm=list(kind.size_mm), tries=attempt,
            )
            return complete & ~full, params
    raise DefectError(f"could not cut a {kind.name} defect ({problem}) in {MAX_TRIES} tries; is this a complete skull "
                      "in the SkullFix orientation (left, posterior, superior)?")
