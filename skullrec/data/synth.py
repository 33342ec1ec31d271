"""Procedural, licence-free binary skulls (the embedded default data set) -> ``skullrec synth``.

A skull is an implicit shape evaluated at the voxel centres of an arbitrary *source grid*
(physical millimetres), in a head frame whose axes match the SkullFix array layout that
:mod:`skullrec.data.defects` assumes: array axis 0 runs to the patient's left, axis 1 to posterior,
axis 2 to superior (an LPS index layout; :func:`source_affine` gives the matching RAS affine).

Anatomy (all sizes in mm, drawn per subject from ``params``):

* cranial vault: a shell between an outer surface ``rho = Ro(u)`` and an inner one
  ``rho = Ro(u) - T(u)`` along every direction ``u`` from the vault centre. ``Ro`` is an egg-shaped
  ellipsoid (different front/back and up/down semi-axes, a narrower forehead) times a smooth
  random low-order polynomial of ``u`` (bilaterally symmetric up to a small asymmetric term);
  the thickness ``T`` varies smoothly (thinner temporal squama, thicker occiput and upper back),
  clipped to 3.5-8 mm;
* skull base: a floor ``z = zf(x, y)`` of thickness ``tb`` with three steps (anterior, middle and
  posterior cranial fossae, a raised sella in the midline) that closes the vault from below,
  two petrous ridges, and the foramen magnum through it;
* face: a thin-walled rounded block under the forehead (its hollow inside stands for the nasal
  cavity and maxillary sinuses) with two cone-shaped orbits, the piriform aperture, and two
  zygomatic arches joining it to the temporal bone;
* truncation: bone below a plane ``cut_height_mm`` under the vertex is removed, like the CT
  field of view of the SkullFix skulls (which end at the skull base);
* pose: a small random rotation and shift of the whole head in the grid.

No library generates skulls, so the shape code is written here; it is plain vectorised numpy
(float32) and only evaluates the expensive terms on voxels near the surfaces.
Same seed, same bytes: every random number comes from one ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io import LPS_TO_RAS, Volume
from ..utils import Progress, bounding_box, seed_sequence

# SkullFix's array layout: +axis0 = patient left, +axis1 = posterior, +axis2 = superior. In RAS
# world coordinates that is a flip of the first two axes (io.LPS_TO_RAS).

# Physical field of view of the default source grid (mm): the largest head the parameter ranges
# below can produce, plus the pose, fits with a margin.
SOURCE_FOV_MM = (180.0, 234.0, 180.0)

# Low-order "harmonics" of the direction u = (ux, uy, uz) used for smooth shape variation.
# Even in ux (left/right symmetric); the asymmetric ux term gets its own small amplitude.
_N_SHAPE_TERMS = 10


def _terms(ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> list[np.ndarray]:
    """The shape terms, one by one (the reference for :func:`_poly`)."""
    ux2 = ux * ux
    return [uy, uz, ux2, uy * uz, uy * uy, uz * uz, ux2 * uz, ux2 * uy, uy * uz * uz, uz * uz * uz]


def _poly(c, ux2, uy, uz, uz2):
    """sum(c[i] * _terms[i]) factored to need few temporaries: it runs on every voxel near a surface."""
    return (
        uy * (c[0] + c[4] * uy + c[3] * uz + c[7] * ux2 + c[8] * uz2)
        + uz * (c[1] + c[5] * uz + c[6] * ux2 + c[9] * uz2)
        + c[2] * ux2
    )


def _as_rng(seed_or_rng: int | np.random.Generator | np.random.SeedSequence) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about z (yaw), x (pitch) and y (roll)."""
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    ry = np.array([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
    return rz @ rx @ ry


def sample_params(seed_or_rng: int | np.random.Generator | np.random.SeedSequence) -> dict[str, Any]:
    """Draw one subject's shape parameters (plain floats/lists, JSON-ready)."""
    rng = _as_rng(seed_or_rng)
    u = rng.uniform
    s = float(np.clip(rng.normal(1.0, 0.035), 0.92, 1.08))  # overall head size
    c_down = u(60, 66) * s
    b_ant, b_post = u(86, 92) * s, u(90, 97) * s
    p: dict[str, Any] = {
        "scale": s,
        # vault: egg-shaped ellipsoid semi-axes (mm)
        "half_width": u(67, 73) * s,
        "front": b_ant,
        "back": b_post,
        "up": u(70, 78) * s,
        "down": c_down,
        "forehead_narrowing": u(0.06, 0.14),
        "shape_coef": (rng.normal(0.0, 0.02, _N_SHAPE_TERMS)).tolist(),
        "asymmetry": float(rng.normal(0.0, 0.006)),
        # bone thickness (mm)
        "thickness": u(5.4, 6.7),
        "thickness_coef": (rng.normal(0.0, 0.06, _N_SHAPE_TERMS)).tolist(),
        "temporal_thinning": u(1.2, 2.2),
        "occipital_thickening": u(0.5, 1.5),
        "parietal_thickening": u(0.6, 1.6),
        # skull base: floor heights of the fossae (mm, negative = below the vault centre)
        "base_thickness": u(6.0, 9.0),
        "anterior_fossa_z": -u(0.24, 0.34) * c_down,
        "middle_fossa_z": -u(0.58, 0.68) * c_down,
        "posterior_fossa_z": -u(0.74, 0.84) * c_down,
        "sella_rise": u(8.0, 14.0),
        "sphenoid_ridge_y": -u(0.20, 0.30) * b_ant,
        "petrous_ridge_y": u(0.04, 0.14) * b_post,
        "petrous_radius": u(6.0, 8.0),
        # foramen magnum: ellipse in the posterior fossa (radii mm, centre behind the petrous ridge)
        "foramen_offset": u(14.0, 22.0),
        "foramen_radii": [u(13.0, 16.0), u(16.0, 19.0)],
        # face block and openings
        "face_half_size": [u(0.68, 0.76), u(27.0, 32.0), u(27.0, 33.0)],  # width as fraction of half_width
        "orbit_radii": [u(18.0, 21.0), u(15.5, 18.0)],
        "orbit_spacing": u(30.0, 35.0),
        "orbit_depth": u(40.0, 48.0),
        "nasal_half_width": u(9.0, 12.0),
        "arch_radius": u(3.5, 4.5),
        # field of view cut under the vertex (SkullFix skulls: 5th-95th percentile 135-172 mm high, median 150)
        "cut_height_mm": u(134.0, 152.0),
        # pose in the grid
        "rotation_deg": [u(-5, 5), u(-6, 6), u(-3, 3)],  # yaw, pitch, roll
        "shift_mm": rng.uniform(-4.0, 4.0, 3).tolist(),
    }
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in p.items()}


class _Head:
    """The implicit functions of one subject, in head coordinates (mm, origin = vault centre)."""

    def __init__(self, p: dict[str, Any]):
        self.p = p
        self.coef = [np.float32(c) for c in p["shape_coef"]]
        self.tcoef = [np.float32(c * p["thickness"]) for c in p["thickness_coef"]]

    def radii(self, ux, uy, uz):
        """Outer radius Ro(u) and vault thickness T(u) (mm) along unit directions u from the vault centre.

        Ro: egg-shaped ellipsoid with a narrower forehead, times (1 + smooth random term).
        T: smooth random variation around the mean, thin temporal squama, thicker occiput.
        """
        p = self.p
        a = np.float32(p["half_width"]) * (1.0 - np.float32(2.0 * p["forehead_narrowing"]) * np.square(np.minimum(uy, 0.0)))
        b = np.where(uy < 0, np.float32(p["front"]), np.float32(p["back"]))
        c = np.where(uz > 0, np.float32(p["up"]), np.float32(p["down"]))
        r = 1.0 / np.sqrt(np.square(ux / a) + np.square(uy / b) + np.square(uz / c))
        ux2 = np.square(ux)
        uz2 = np.square(uz)
        delta = _poly(self.coef, ux2, uy, uz, uz2) + np.float32(p["asymmetry"]) * ux
        t = _poly(self.tcoef, ux2, uy, uz, uz2) + np.float32(p["thickness"])
        ro = r * (1.0 + np.clip(delta, -0.08, 0.08))
        t -= np.float32(p["temporal_thinning"]) * np.square(ux) * np.exp(-np.square(uz + 0.15) / 0.08)
        t += np.float32(p["occipital_thickening"]) * np.square(np.square(np.maximum(uy, 0.0)))
        # the upper back of the vault is thicker (SkullFix: ~6.8 mm under the defects, 5.8 mm skull mean)
        t += np.float32(p["parietal_thickening"]) * np.maximum(uz, 0.0) * (0.5 + 0.5 * uy)
        return ro, np.clip(t, 3.5, 8.0)

    def floor_z(self, x, y):
        """Height of the mid-surface of the skull base under (x, y): three fossae and the sella."""
        p = self.p
        za = p["anterior_fossa_z"] + 4.0 * np.exp(-np.square((np.abs(x) - 30.0) / 12.0))  # orbital roofs
        zm = p["middle_fossa_z"] + p["sella_rise"] * np.exp(-np.square(x / 14.0))
        zp = np.float32(p["posterior_fossa_z"])
        s1 = 1.0 / (1.0 + np.exp(-(y - p["sphenoid_ridge_y"]) / 5.0))
        s2 = 1.0 / (1.0 + np.exp(-(y - p["petrous_ridge_y"]) / 5.0))
        return (za * (1 - s1) + (zm * (1 - s2) + zp * s2) * s1).astype(np.float32)

    def shell_point(self, direction: np.ndarray) -> np.ndarray:
        """The mid-thickness vault point along a (not necessarily unit) direction."""
        u = np.asarray(direction, dtype=np.float64)
        u = u / np.linalg.norm(u)
        ro, t = self.radii(*(np.float32(v) for v in u))
        return u * (float(ro) - 0.5 * float(t))

    def petrous_segments(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Axes of the two petrous ridges: from the lateral skull wall (ear) forwards and medially to near the sella."""
        p = self.p
        z0 = float(self.floor_z(np.float32(45.0), np.float32(p["petrous_ridge_y"])))
        out = []
        for side in (-1.0, 1.0):
            a0 = self.shell_point(np.array([side * 0.92, 0.12, z0 / p["down"] * 0.9]))
            a1 = np.array([side * 14.0, p["petrous_ridge_y"] - 14.0, z0 + 6.0])
            out.append((a0.astype(np.float64), a1))
        return out

    def vertex_z(self) -> float:
        return float(self.radii(np.float32(0), np.float32(0), np.float32(1))[0])

    def face_geometry(self) -> dict[str, Any]:
        p = self.p
        hx = p["face_half_size"][0] * p["half_width"]
        hy, hz = p["face_half_size"][1], p["face_half_size"][2]
        yc = -p["front"] + hy - 2.0
        zc = p["anterior_fossa_z"] - hz + 8.0
        return {"half": (hx, hy, hz), "centre": (0.0, yc, zc), "y_open": yc - hy - 2.0, "z_orbit": zc + 0.25 * hz}


# Thinnest bone feature (mm). render() samples a 2x coarser grid first and refines only near
# surfaces, which is exact for features at least one coarse step thick; walls are kept above it.
FACE_WALL_MM = 4.0
MIN_FEATURE_MM = 3.5  # thinnest vault (clip of T) and base; walls, arches are thicker


def _face(h: _Head, x, y, z, cavity):
    """Facial bone at the given points: a thin-walled block with orbits, nasal aperture and zygomatic arches."""
    p = h.p
    g = h.face_geometry()
    hx, hy, hz = g["half"]
    _, yc, zc = g["centre"]
    w = FACE_WALL_MM

    def superellipsoid(ax, ay, az):
        return (np.square(np.square(x / ax)) + np.square(np.square((y - yc) / ay)) + np.square(np.square((z - zc) / az))) <= 1.0

    # a hollow block: the maxillary sinuses and nasal cavity are the air inside
    face = superellipsoid(hx, hy, hz) & ~superellipsoid(hx - w, hy - w, hz - w)
    y_open, z_orb, depth = g["y_open"], g["z_orbit"], p["orbit_depth"]
    t = np.clip((y - y_open) / depth, 0.0, 1.0)
    taper = 1.0 - 0.8 * t
    in_depth = y < y_open + depth
    holes = np.zeros_like(face)
    walls = np.zeros_like(face)
    for side in (-1.0, 1.0):
        ox = side * p["orbit_spacing"]
        cx = ox + (side * 14.0 - ox) * t  # the orbit axis runs back and medially to the apex
        q = np.square((x - cx) / (p["orbit_radii"][0] * taper)) + np.square((z - z_orb) / (p["orbit_radii"][1] * taper))
        hole = (q < 1.0) & in_depth
        holes |= hole
        # orbital walls: a cone ~w thicker than the cavity
        qw = np.square((x - cx) / (p["orbit_radii"][0] * taper + w)) + np.square((z - z_orb) / (p["orbit_radii"][1] * taper + w))
        walls |= (qw < 1.0) & (y < y_open + depth + w) & ~hole
    face |= walls & superellipsoid(hx, hy, hz)
    # piriform aperture: the nasal opening through the front wall
    nasal = (np.abs(x) < p["nasal_half_width"]) & (z < z_orb - 4.0) & (y < yc)
    face &= ~holes & ~nasal & ~cavity
    # zygomatic arches: capsules from the lateral orbital rim back to the temporal bone
    for side in (-1.0, 1.0):
        a0 = np.array([side * (hx - 4.0), y_open + 12.0, zc - 4.0])
        a1 = h.shell_point(np.array([side * 0.85, -0.05, -0.45]))
        seg = a1 - a0
        tt = np.clip(((x - a0[0]) * seg[0] + (y - a0[1]) * seg[1] + (z - a0[2]) * seg[2]) / float(seg @ seg), 0.0, 1.0)
        d2 = np.square(x - a0[0] - tt * seg[0]) + np.square(y - a0[1] - tt * seg[1]) + np.square(z - a0[2] - tt * seg[2])
        face |= d2 <= p["arch_radius"] ** 2
    return face


def _bone_at(h: _Head, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_cut: float) -> np.ndarray:
    """Bone (bool) at points given in head coordinates (flat float32 arrays)."""
    p = h.p
    rho = np.sqrt(np.square(x) + np.square(y) + np.square(z))
    inv = 1.0 / np.maximum(rho, np.float32(1e-3))
    ro, t = h.radii(x * inv, y * inv, z * inv)
    ri = ro - t
    zf = h.floor_z(x, y)
    half_tb = np.float32(0.5 * p["base_thickness"])
    bone = (rho <= ro) & (rho >= ri) & (z >= zf - half_tb)  # vault shell, closed below by the floor
    floor = (np.abs(z - zf) <= half_tb) & (rho <= ro - 1.0)
    # foramen magnum: a vertical elliptic hole through the posterior fossa floor
    fy = p["petrous_ridge_y"] + p["foramen_offset"]
    fr = p["foramen_radii"]
    floor &= (np.square(x / fr[0]) + np.square((y - fy) / fr[1])) >= 1.0
    bone |= floor
    # petrous ridges: dense bony pyramids running from the ear region forwards to the sella
    py = p["petrous_ridge_y"]
    near = np.flatnonzero((np.abs(y - py) < 35.0) & (z < p["middle_fossa_z"] + 30.0))
    if near.size:
        xs, ys, zs = x[near], y[near], z[near]
        for a0, a1 in h.petrous_segments():
            seg = a1 - a0
            tt = np.clip(((xs - a0[0]) * seg[0] + (ys - a0[1]) * seg[1] + (zs - a0[2]) * seg[2]) / float(seg @ seg), 0.0, 1.0)
            d2 = np.square(xs - a0[0] - tt * seg[0]) + np.square(ys - a0[1] - tt * seg[1]) + np.square(zs - a0[2] - tt * seg[2])
            bone[near] |= (d2 <= np.square(p["petrous_radius"] * (1.0 - 0.4 * tt))) & (rho[near] <= ro[near])
    g = h.face_geometry()
    hx, hy, hz = g["half"]
    _, yc, zc = g["centre"]
    sel = np.flatnonzero((np.abs(x) <= hx + 8.0) & (y <= yc + hy + 1.0) & (z <= zc + hz + 1.0) & (z >= zc - hz - 1.0))
    if sel.size:
        cavity = (rho[sel] < ri[sel]) & (z[sel] > zf[sel] + half_tb)
        bone[sel] |= _face(h, x[sel], y[sel], z[sel], cavity)
    bone &= z >= z_cut
    return bone


def render(params: dict[str, Any], shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Evaluate the skull with these parameters at the voxel centres of a grid (bool array).

    Coarse to fine: the shape is sampled on every second voxel first; only voxels in a coarse cell
    (the cube between 2x2x2 neighbouring coarse samples) whose corners hold both bone and
    background are evaluated at full resolution, the rest copy a corner. A slab thicker than the
    cell edge that meets a cell always contains one of its corners, so this is exact as long as
    every bone feature is thicker than one coarse step (2 * spacing <= MIN_FEATURE_MM); coarser
    grids are evaluated voxel by voxel. Holes cut into bone can leave thinner remnants, so the
    cells near them (:func:`_thin_zone`) are always evaluated in full. The result equalled the
    voxel-by-voxel evaluation on all 60 seeds checked (tests check 3).
    """
    h = _Head(params)
    p = params
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, dtype=np.float64)
    rot = _rotation(*p["rotation_deg"]).T.astype(np.float32)
    vz = h.vertex_z()
    z_cut = vz - p["cut_height_mm"]
    # The head's bounding-box centre (head coordinates) goes to the grid centre plus the shift:
    # head = R^T (g - shift) + m, with g the voxel centre relative to the grid centre (mm).
    m = np.array([0.0, 0.5 * (p["back"] - p["front"]), 0.5 * (vz + z_cut)], dtype=np.float32)
    axes = [((np.arange(n) - (n - 1) / 2.0) * s - t).astype(np.float32) for n, s, t in zip(shape, sp, p["shift_mm"])]

    def head_coords(i, j, k):
        gx, gy, gz = axes[0][i], axes[1][j], axes[2][k]
        return tuple(rot[r, 0] * gx + rot[r, 1] * gy + rot[r, 2] * gz + m[r] for r in range(3))

    if 2.0 * float(sp.max()) > MIN_FEATURE_MM:
        # coarse grids: a coarse pass would step over the thinnest bone, so evaluate every voxel
        i, j, k = (a.ravel() for a in np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"))
        return _largest_component(_bone_at(h, *head_coords(i, j, k), z_cut).reshape(shape))
    ci = [np.arange(0, n, 2) for n in shape]
    cx, cy, cz = head_coords(ci[0][:, None, None], ci[1][None, :, None], ci[2][None, None, :])
    cshape = cx.shape
    coarse = _bone_at(h, cx.ravel(), cy.ravel(), cz.ravel(), z_cut).reshape(cshape)
    # cells between neighbouring coarse samples whose 8 corners disagree hold a surface
    cells = tuple(n - 1 for n in cshape)
    any_bone, all_bone = np.zeros(cells, dtype=bool), np.ones(cells, dtype=bool)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                corner = coarse[a : a + cells[0], b : b + cells[1], c : c + cells[2]]
                any_bone |= corner
                all_bone &= corner
    todo = any_bone & ~all_bone
    # Holes cut into bone (orbits, piriform aperture, foramen magnum, the cut plane) can leave
    # remnants thinner than a coarse step: cells near them are always evaluated in full.
    thin = _thin_zone(h, cx, cy, cz, z_cut, near_bone=ndimage.maximum_filter(coarse, size=3))
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                todo |= thin[a : a + cells[0], b : b + cells[1], c : c + cells[2]]
    for axis, n in enumerate(shape):
        todo = _spread_cells(todo, axis, n)
    # voxels elsewhere lie in cells with 8 equal corners: they take the value of a corner
    out = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: shape[0], : shape[1], : shape[2]]
    fine = np.flatnonzero(todo)
    i, j, k = np.unravel_index(fine, shape)
    fx, fy, fz = head_coords(i, j, k)
    out.reshape(-1)[fine] = _bone_at(h, fx, fy, fz, z_cut)
    return _largest_component(out)


def _thin_zone(h: _Head, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_cut: float, near_bone: np.ndarray) -> np.ndarray:
    """Where subtracted shapes can leave thin bone: the face block (next to coarse bone), the foramen magnum and the cut plane."""
    p = h.p
    g = h.face_geometry()
    hx, hy, hz = g["half"]
    _, yc, zc = g["centre"]
    margin = 3.0  # one coarse step
    face = (np.abs(x) <= hx + margin) & (np.abs(y - yc) <= hy + margin) & (np.abs(z - zc) <= hz + margin)
    fy = p["petrous_ridge_y"] + p["foramen_offset"]
    fr = p["foramen_radii"]
    foramen = (np.square(x / (fr[0] + margin)) + np.square((y - fy) / (fr[1] + margin)) <= 1.0) & (z < p["posterior_fossa_z"] + 15.0)
    # the cut plane only matters where it crosses the skull (inside the vault's largest radius)
    r_max = 1.1 * max(p["half_width"], p["front"], p["back"], p["up"], p["down"])
    cut = (np.abs(z - z_cut) <= margin) & (np.square(x) + np.square(y) + np.square(z) <= r_max**2)
    return (face & near_bone) | foramen | cut


def _spread_cells(cells: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Map a per-cell flag (cell i spans coarse samples i and i+1 = fine voxels 2i..2i+2) to fine voxels along one axis.

    Odd fine voxel 2i+1 lies in cell i, even voxel 2i on the faces of cells i-1 and i; fine voxels
    past the last coarse sample belong to no cell and are always flagged (evaluated exactly).
    """
    m = cells.shape[axis]
    shape = list(cells.shape)
    shape[axis] = n
    out = np.ones(shape, dtype=bool)
    idx = [slice(None)] * cells.ndim

    def at(s: slice) -> tuple[slice, ...]:
        idx[axis] = s
        return tuple(idx)

    out[at(slice(1, 2 * m, 2))] = cells
    even = np.zeros([m + 1 if d == axis else k for d, k in enumerate(cells.shape)], dtype=bool)
    even[at(slice(0, m))] |= cells
    even[at(slice(1, m + 1))] |= cells
    out[at(slice(0, 2 * m + 1, 2))] = even
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected piece: where two surfaces (orbit wall, cut plane, foramen) meet
    at a grazing angle, sampling can leave a few isolated voxels (1-4 voxels in 40 test skulls)."""
    bb = bounding_box(mask)
    if bb is None:
        return mask
    box = tuple(slice(lo, hi) for lo, hi in zip(*bb))  # label only the bone's bounding box
    labels, n = ndimage.label(mask[box])
    if n <= 1:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    out = np.zeros_like(mask)
    out[box] = labels == int(np.argmax(counts))
    return out


def generate_skull(
    seed_or_rng: int | np.random.Generator | np.random.SeedSequence,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One procedural complete skull (bool, ``shape``) on a grid of ``spacing`` mm and its parameters.

    The default grid is :func:`source_grid` for 64^3 output. Axes follow the SkullFix layout
    (left, posterior, superior); :func:`source_affine` gives the grid's RAS affine.
    """
    if shape is None or spacing is None:
        shape, spacing = source_grid(64)
    params = sample_params(seed_or_rng)
    return render(params, shape, spacing), params


def source_grid(size: int = 64) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and isotropic spacing of the source grid for ``size``^3 output: about 2x finer than the output."""
    if size < 8:
        raise InputError(f"--size: must be >= 8, got {size}")
    s = round(96.0 / size, 4)  # 1.5 mm for 64^3 (output voxels are ~2.2-3.1 mm)
    shape = tuple(int(math.ceil(f / s)) for f in SOURCE_FOV_MM)
    return shape, (s, s, s)


def source_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of a source grid in the SkullFix index layout, centred on the world origin."""
    aff = np.eye(4)
    aff[:3, :3] = LPS_TO_RAS @ np.diag(np.asarray(spacing, dtype=np.float64))
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2.0)
    return aff


def _case_streams(seed: int, index: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence, np.random.SeedSequence]:
    """Independent seed sequences (skull, set-1 defect, set-2 defect) of case ``index`` of a data set.

    ``SeedSequence(seed, spawn_key=(index,))`` is what ``SeedSequence(seed).spawn(n)[index]`` gives,
    so one case can be regenerated on its own from (seed, index).
    """
    ss = seed_sequence(seed, spawn_key=(int(index),))
    skull, set1, set2 = ss.spawn(3)
    return skull, set1, set2


def make_case(
    seed: int, index: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], sets: tuple[int, ...] = (1,),
    timing: dict[str, float] | None = None,
) -> tuple[np.ndarray, dict[str, Any], dict[int, tuple[np.ndarray, dict[str, Any]]]]:
    """Case ``index`` of the data set with master ``seed``: (complete, shape params, {set: (defective, defect params)}).

    ``timing``, when given, accumulates the seconds spent in "generate" and "defects".
    """
    from .defects import set1_defect, set2_defect

    s_skull, s1, s2 = _case_streams(seed, index)
    t0 = time.perf_counter()
    complete, params = generate_skull(s_skull, shape, spacing)
    t1 = time.perf_counter()
    cut = {1: (set1_defect, s1), 2: (set2_defect, s2)}
    out = {k: cut[k][0](complete, spacing, np.random.default_rng(cut[k][1])) for k in sets}
    if timing is not None:
        timing["generate"] = timing.get("generate", 0.0) + t1 - t0
        timing["defects"] = timing.get("defects", 0.0) + time.perf_counter() - t1
    return complete, params, out


@dataclass
class SynthResult:
    """What :func:`write_synthetic` wrote: the folder, one manifest record per case and split, timings."""

    out: Path
    records: list[dict[str, Any]]
    timing: dict[str, float]  # seconds per stage: generate, defects, prepare, write
    wall_s: float
    cpu_s: float


def write_synthetic(
    out: Path,
    n_train: int = 100,
    n_eval: int = 20,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SynthResult:
    """Write the procedural data set: train (set-1 defects), eval_set1 and eval_set2 (set-1 / set-2 on held-out skulls).

    Skulls are generated on :func:`source_grid` (about 2x finer than ``size``), defects are cut
    there, and every pair goes through :func:`skullrec.data.resample.prepare_pair` like a real SkullFix pair.
    ``progress(done, total)`` is called after each skull. The flags are checked by ``skullrec.cli.synth_command``.
    """
    from .layout import check_output_dir, staged_output, write_case, write_manifest
    from .resample import DEFAULT_MARGIN_MM, prepare_pair

    check_output_dir(out, overwrite)
    shape, spacing = source_grid(size)
    affine = source_affine(shape, spacing)
    timing = {"generate": 0.0, "defects": 0.0, "prepare": 0.0, "write": 0.0}
    records: list[dict[str, Any]] = []
    total = n_train + n_eval
    t_start, cpu_start = time.perf_counter(), time.process_time()
    with staged_output(out, overwrite) as staging:
        for index in range(total):
            is_eval = index >= n_train
            cid = f"syn{index:04d}"
            complete, params, defects = make_case(seed, index, shape, spacing, sets=(1, 2) if is_eval else (1,), timing=timing)
            cut = [("eval_set1" if is_eval else "train", *defects[1])] + ([("eval_set2", *defects[2])] if is_eval else [])
            cvol = Volume(complete.astype(np.uint8), affine)
            for split, defective, dparams in cut:
                t3 = time.perf_counter()
                c_out, d_out = prepare_pair(cvol, Volume(defective.astype(np.uint8), affine), size, DEFAULT_MARGIN_MM)
                t4 = time.perf_counter()
                counts = write_case(staging, split, cid, c_out.data, d_out.data, c_out.affine)
                timing["prepare"] += t4 - t3
                timing["write"] += time.perf_counter() - t4
                records.append({
                    "split": split,
                    "case_id": cid,
                    "source": "synthetic",
                    "seed": int(seed),
                    "spawn_key": [index],
                    "shape_params": params,
                    "defect": dparams,
                    "source_shape": list(shape),
                    "source_spacing": list(spacing),
                    "source_bone_voxels": int(complete.sum()),
                    "bone_fraction": counts["complete_voxels"] / float(size**3),
                    "implant_fraction": counts["implant_voxels"] / max(counts["complete_voxels"], 1),
                    **counts,
                })
            if progress is not None:
                progress(index + 1, total)
        meta = {
            "kind": "synthetic",
            "command": "skullrec synth",
            "generator": "skullrec.data.synth (procedural, licence-free)",
            "seed": int(seed),
            "seeding": "case i: SeedSequence(seed, spawn_key=(i,)).spawn(3) -> (skull, set-1 defect, set-2 defect)",
            "n_train": n_train,
            "n_eval": n_eval,
            "size": size,
            "margin_mm": DEFAULT_MARGIN_MM,
            "source_shape": list(shape),
            "source_spacing": list(spacing),
            "source_layout": "array axes: +0 left, +1 posterior, +2 superior (SkullFix)",
        }
        write_manifest(staging, records, meta)
    return SynthResult(Path(out), records, timing, time.perf_counter() - t_start, time.process_time() - cpu_start)
