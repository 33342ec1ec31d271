"""The mid-sagittal plane of a skull: the plane it is most nearly mirror-symmetric about, found by registration.

Skulls are close to left-right symmetric, but neither the scanner nor a patient's head puts that plane at
the volume's centre: heads are tilted and shifted. So the plane is measured, not assumed: the mask is
mirrored (SimpleITK's ``Flip`` along the left-right voxel axis), the mirror image is rigidly registered back
onto the mask (SimpleITK's registration framework, mean squares on Gaussian-smoothed masks, coarse to fine),
and "mirror, then move" is then a reflection that maps the skull onto itself. A reflection x -> x - 2 (n.x - d) n
fixes exactly one plane; its normal n is the eigenvector of the reflection's linear part with eigenvalue -1,
and the midpoint of any point and its image lies on the plane.

Only the plane extraction from the registered transform is written here; registration, smoothing and
resampling are SimpleITK's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plane:
    """A plane ``normal . x = offset`` in world mm (the frame of the affine it was found with); unit normal."""

    normal: np.ndarray
    offset: float

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of (N, 3) world points from the plane, positive on the normal's side."""
        return np.asarray(points, dtype=np.float64) @ self.normal - self.offset

    def reflect(self, points: np.ndarray) -> np.ndarray:
        """Mirror (N, 3) world points across the plane."""
        p = np.asarray(points, dtype=np.float64)
        return p - 2.0 * self.signed_distance(p)[:, None] * self.normal[None, :]

    def reflection_matrix(self) -> np.ndarray:
        """The 4 x 4 homogeneous world-space reflection across the plane."""
        m = np.eye(4)
        m[:3, :3] -= 2.0 * np.outer(self.normal, self.normal)
        m[:3, 3] = 2.0 * self.offset * self.normal
        return m


def _sitk_mask(mask: np.ndarray, spacing: np.ndarray, sigma_mm: float):
    import SimpleITK as sitk

    # SimpleITK indexes (x, y, z) = numpy's reversed axes; transposing keeps numpy axis 0 as ITK's x.
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(mask, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return sitk.SmoothingRecursiveGaussian(img, sigma_mm)


def mid_sagittal_plane(mask: np.ndarray, affine: np.ndarray, *, lr_axis: int = 0, sigma_mm: float = 2.0) -> Plane:
    """The mid-sagittal plane of a skull mask, in the world frame of ``affine`` (4 x 4, voxel index -> mm).

    ``lr_axis`` is the voxel axis that runs left-right (axis 0 in skullrec's canonical order). The
    registration runs in a frame of voxel index x spacing; the plane is mapped to world mm at the end,
    which is exact for any affine without shear (every orientation, oblique grids included).
    """
    import SimpleITK as sitk

    mask = np.asarray(mask)
    if mask.ndim != 3 or not mask.any():
        raise ValueError("mid_sagittal_plane needs a non-empty 3-D mask")
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    rot = affine[:3, :3] / spacing  # orthonormal for an affine without shear: world = rot @ q + t, q = index * spacing
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-4):
        raise ValueError("mid_sagittal_plane: the affine is sheared")

    fixed = _sitk_mask(mask, spacing, sigma_mm)
    flip_axes = [False, False, False]
    flip_axes[lr_axis] = True
    moving = sitk.Flip(fixed, flip_axes)
    # Flip reverses the voxel order but also the direction cosines, so the physical content would be unchanged;
    # giving it the fixed image's geometry makes it the mirror image: q_lr -> (n_lr - 1) * s_lr - q_lr.
    moving.CopyInformation(fixed)

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=100,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(init, inPlace=False)
    found = reg.Execute(fixed, moving)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0)) if found.GetName() == "CompositeTransform" else sitk.Euler3DTransform(found)

    # T(q) = R (q - c) + c + t maps fixed points to moving ones; F mirrors the lr axis about the centre.
    r = np.asarray(euler.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(euler.GetCenter(), dtype=np.float64)
    t = np.asarray(euler.GetTranslation(), dtype=np.float64)
    a_f = np.eye(3)
    a_f[lr_axis, lr_axis] = -1.0
    b_f = np.zeros(3)
    b_f[lr_axis] = (mask.shape[lr_axis] - 1) * spacing[lr_axis]
    a_s = a_f @ r  # S = F o T: a reflection that maps the skull onto itself
    b_s = a_f @ (c + t - r @ c) + b_f

    # For a reflection, (I - A) / 2 = n n^T: its leading eigenvector is the normal.
    w, v = np.linalg.eigh((np.eye(3) - 0.5 * (a_s + a_s.T)) / 2.0)
    n_q = v[:, int(np.argmax(w))]
    if n_q[lr_axis] < 0:
        n_q = -n_q
    centroid = np.argwhere(mask).mean(axis=0) * spacing
    mid = 0.5 * (centroid + (a_s @ centroid + b_s))
    d_q = float(n_q @ mid)

    n_w = rot @ n_q
    return Plane(normal=n_w / np.linalg.norm(n_w), offset=d_q + float(n_w @ affine[:3, 3]))
