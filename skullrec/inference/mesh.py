"""Surface meshes of binary masks in world millimetres (marching cubes) and binary STL export.

**STL frame.** ``skullrec predict --stl`` writes meshes in **LPS millimetres** (x towards the
patient's left, y posterior, z superior): the frame of DICOM, ITK, NRRD files and 3D Slicer, which
reads an STL as LPS unless its header says otherwise. The 80-byte header names it
(``skullrec CASE implant SPACE=LPS mm``; Slicer recognises ``SPACE=LPS``). A vertex lies where
ITK / Slicer place the same point of the NIfTI or NRRD written beside it; for a NIfTI that stores no
orientation (qform and sform codes 0) that is ITK's placement too (index x spacing, no flips, which
is the voxel order skullrec assumes for such a file; nibabel centres and flips such a file instead).
"""

from __future__ import annotations

import numpy as np

# RAS <-> LPS: negate the first two world axes (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# How far --smooth may move the surface: at most this far from the voxel surface (mm).
MAX_SMOOTH_SHIFT_MM = 0.5

# Enclosed voids smaller than this are filled before meshing for print (see printable_mesh).
MAX_VOID_MM3 = 100.0


def lps_affine(affine: np.ndarray) -> np.ndarray:
    """The voxel -> LPS mm affine of a voxel -> RAS mm affine (skullrec's :class:`~skullrec.io.Volume` frame)."""
    return RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)


def mesh_from_mask(mask: np.ndarray, affine: np.ndarray, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Surface mesh of a binary mask in world mm: (verts (V, 3) float64, faces (F, 3) int).

    Marching cubes (scikit-image) in voxel index space, on the mask's bounding box padded by one
    voxel so that bone touching the volume border still gives a closed surface (and a 512^3 grid
    is not scanned for a small implant); vertices are then mapped through ``affine`` (to whatever
    world frame it maps to: RAS for a Volume's own affine, LPS for :func:`lps_affine` of it).
    Faces are wound with outward normals in world space (positive signed volume).
    An empty mask gives empty arrays.
    """
    from skimage.measure import marching_cubes

    mask = np.asarray(mask)
    if not mask.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = np.array([n[0] for n in nz])
    box = tuple(slice(n[0], n[-1] + 1) for n in nz)
    padded = np.pad(mask[box].astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(padded, level=level, allow_degenerate=False)
    verts = verts - 1.0 + lo  # undo the padding and the crop: back to the mask's voxel indices
    affine = np.asarray(affine, dtype=np.float64)
    world = verts @ affine[:3, :3].T + affine[:3, 3]
    # For a bright-inside mask skimage's winding is inward-facing in index space (checked by the
    # signed volume in the tests); a right-handed affine keeps that winding in world space and a
    # left-handed one mirrors it, so flip exactly when det > 0 to get outward normals in mm.
    faces = faces.astype(np.int64)
    if np.linalg.det(affine[:3, :3]) > 0:
        faces = faces[:, ::-1]
    return world, np.ascontiguousarray(faces)


def smooth_mesh(verts: np.ndarray, faces: np.ndarray, max_shift_mm: float = MAX_SMOOTH_SHIFT_MM,
                iterations: int = 10) -> np.ndarray:
    """Vertices of a marching-cubes mesh smoothed by Taubin's filter (trimesh), none moved more than ``max_shift_mm``.

    Taubin's lambda/mu filter removes the voxel staircase without the shrinking of plain Laplacian
    smoothing; the topology (watertightness, shells) is unchanged, only vertices move. Every
    original vertex lies on the unsmoothed surface, so capping each vertex's move at
    ``max_shift_mm`` keeps the smoothed surface within that distance of the voxel surface.
    """
    import trimesh

    verts = np.asarray(verts, dtype=np.float64)
    if len(faces) == 0:
        return verts.copy()
    mesh = trimesh.Trimesh(vertices=verts.copy(), faces=faces, process=False)
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.52, iterations=iterations)
    shift = np.asarray(mesh.vertices) - verts
    length = np.linalg.norm(shift, axis=1, keepdims=True)
    scale = np.minimum(1.0, max_shift_mm / np.maximum(length, 1e-12))
    return verts + shift * scale


def printable_mesh(mask: np.ndarray, affine: np.ndarray, smooth: bool = False,
                   max_void_mm3: float = MAX_VOID_MM3) -> tuple[np.ndarray, np.ndarray]:
    """A mask's surface for printing: (verts, faces) in the frame of ``affine``, closed and outward.

    Small enclosed cavities (background sealed inside the mask, below ``max_void_mm3``; SkullFix's
    own implants have a few of ~0.02-0.8 mm^3) are filled first: each would be an inner shell of
    the mesh, a bubble inside the printed part. Large ones (a skull's cranial cavity, were it
    closed) are anatomy and stay. ``smooth``: :func:`smooth_mesh` (within
    :data:`MAX_SMOOTH_SHIFT_MM` of the voxel surface).
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if not mask.any():
        return mesh_from_mask(mask, affine)
    affine = np.asarray(affine, dtype=np.float64)
    # Worked on inside the mask's bounding box (the background outside it is all connected to the
    # outside anyway): filling a whole 512^2 x Z grid costs seconds, the box of an implant little.
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(n[0], n[-1] + 1) for n in nz)
    shift = np.eye(4)
    shift[:3, 3] = [n[0] for n in nz]
    solid = mask[box].astype(bool)
    voids = ndimage.binary_fill_holes(solid) & ~solid
    if voids.any():
        labels, n = ndimage.label(voids)
        sizes = np.bincount(labels[voids], minlength=n + 1) * abs(np.linalg.det(affine[:3, :3]))
        small = sizes < max_void_mm3
        small[0] = False
        solid |= small[labels]
    verts, faces = mesh_from_mask(solid, affine @ shift)
    if smooth and len(faces):
        verts = smooth_mesh(verts, faces)
    return verts, faces


def count_shells(verts: np.ndarray, faces: np.ndarray) -> int:
    """Connected pieces of a triangle mesh (trimesh's ``body_count``); 0 for an empty mesh."""
    import trimesh

    if len(faces) == 0:
        return 0
    return int(trimesh.Trimesh(vertices=verts, faces=faces, process=False).body_count)


def stl_name(case: str, kind: str) -> str:
    """The STL header text of a case's mesh: names the case, the part and the frame (``SPACE=LPS``, mm)."""
    return f"skullrec {case} {kind} SPACE=LPS mm"


def stl_bytes(verts: np.ndarray, faces: np.ndarray, name: str = "skullrec") -> bytes:
    """A binary STL (mm) of a triangle mesh, via trimesh; ``name`` goes into the 80-byte header."""
    import trimesh

    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=False)
    payload = mesh.export(file_type="stl")
    # The binary STL header is 80 free-form bytes; put the name there (slicers show it).
    header = name.encode("ascii", "replace")[:80].ljust(80, b" ")
    return header + payload[80:]
