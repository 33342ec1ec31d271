"""Surface meshes of binary masks in world millimetres (marching cubes) and binary STL export.
"""

from __future__ import annotations

import numpy as np


def mesh_from_mask(mask: np.ndarray, affine: np.ndarray, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Surface mesh of a binary mask in world mm: (verts (V, 3) float64 RAS mm, faces (F, 3) int).

    Marching cubes (scikit-image) in voxel index space, on a mask padded by one voxel so that bone
    touching the volume border still gives a closed surface; vertices are then mapped through
    ``affine``. Faces are wound with outward normals in world space (positive signed volume).
    An empty mask gives empty arrays.
    """
    from skimage.measure import marching_cubes

    mask = np.asarray(mask)
    if not mask.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    padded = np.pad(mask.astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(padded, level=level, allow_degenerate=False)
    verts = verts - 1.0  # undo the padding offset: back to the mask's voxel indices
    affine = np.asarray(affine, dtype=np.float64)
    world = verts @ affine[:3, :3].T + affine[:3, 3]
    # For a bright-inside mask skimage's winding is inward-facing in index space (checked by the
    # signed volume in the tests); a right-handed affine keeps that winding in world space and a
    # left-handed one mirrors it, so flip exactly when det > 0 to get outward normals in mm.
    faces = faces.astype(np.int64)
    if np.linalg.det(affine[:3, :3]) > 0:
        faces = faces[:, ::-1]
    return world, np.ascontiguousarray(faces)


def stl_bytes(verts: np.ndarray, faces: np.ndarray, name: str = "skullrec") -> bytes:
    """A binary STL (mm) of a triangle mesh, via trimesh; ``name`` goes into the 80-byte header."""
    import trimesh

    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=False)
    payload = mesh.export(file_type="stl")
    # The binary STL header is 80 free-form bytes; put the name there (slicers show it).
    header = name.encode("ascii", "replace")[:80].ljust(80, b" ")
    return header + payload[80:]
