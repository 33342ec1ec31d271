"""Render a defective skull and its predicted implant (a `skullrec predict` output) as a PNG.

Marching cubes (skimage, via skullrec.inference.mesh.mesh_from_mask) on the masks block-reduced by
--step voxels per axis (skimage block_reduce, max: thin bone stays), drawn with matplotlib's
Poly3DCollection from two viewpoints, in mm. No GPU, no browser.

    .venv/bin/python scripts/render_implant.py --defective IN/103.nrrd --implant OUT/implant/103.nii.gz \
        --out docs/img/stage2_103.png [--step 3] [--title TEXT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # noqa: E402
from skimage.measure import block_reduce  # noqa: E402

from skullrec.inference.mesh import mesh_from_mask  # noqa: E402
from skullrec.io import read_volume  # noqa: E402


def coarse_mesh(mask: np.ndarray, affine: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Mesh (verts in mm, faces) of ``mask`` reduced by ``step`` voxels per axis (max pooling)."""
    small = block_reduce(mask.astype(np.uint8), (step, step, step), np.max)
    scaled = np.asarray(affine, dtype=np.float64).copy()
    scaled[:3, :3] = scaled[:3, :3] * step
    # block centre of block i is voxel step*i + (step-1)/2 of the full grid
    scaled[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.full(3, (step - 1) / 2.0)
    return mesh_from_mask(small, scaled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defective", type=Path, required=True)
    ap.add_argument("--implant", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--step", type=int, default=3)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    d, imp = read_volume(args.defective), read_volume(args.implant)
    skull = coarse_mesh(d.data.astype(bool), d.affine, args.step)
    implant = coarse_mesh(imp.data.astype(bool), imp.affine, max(1, args.step - 1))
    fig = plt.figure(figsize=(11, 5.5), dpi=110)
    for k, (elev, azim) in enumerate(((35, -60), (80, -90))):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        for (v, f), colour, alpha in ((skull, (0.85, 0.82, 0.75), 0.35), (implant, (0.85, 0.2, 0.15), 1.0)):
            if len(f):
                ax.add_collection3d(Poly3DCollection(v[f], facecolors=[colour], edgecolors=[(0, 0, 0, 0)], alpha=alpha, shade=True))
        pts = skull[0] if len(skull[0]) else implant[0]
        lo, hi = pts.min(0), pts.max(0)
        mid, half = (lo + hi) / 2, (hi - lo).max() / 2
        ax.set_xlim(mid[0] - half, mid[0] + half)
        ax.set_ylim(mid[1] - half, mid[1] + half)
        ax.set_zlim(mid[2] - half, mid[2] + half)
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        ax.set_zlabel("z (mm)")
    fig.suptitle(args.title or f"{args.defective.name}: defective skull (grey) and stage-2 implant (red)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}: skull {len(skull[1])} faces, implant {len(implant[1])} faces, {int(imp.data.sum())} implant voxels")


if __name__ == "__main__":
    main()
