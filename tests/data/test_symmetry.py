"""The mid-sagittal plane is recovered from a symmetric synthetic skull tilted and shifted by a known amount."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from skullrec.data.symmetry import Plane, mid_sagittal_plane
from skullrec.data.synth import generate_skull

SPACING = 2.0


def _rotation(yaw_deg: float, roll_deg: float) -> np.ndarray:
    a, b = math.radians(yaw_deg), math.radians(roll_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return rz @ ry


@pytest.fixture(scope="module")
def symmetric_skull() -> np.ndarray:
    skull, _ = generate_skull(4, (96, 118, 92), (SPACING,) * 3)
    return skull | skull[::-1]  # exactly mirror-symmetric about the grid's mid-plane along axis 0


@pytest.mark.parametrize("yaw, roll, shift", [(0.0, 0.0, (0.0, 0.0, 0.0)), (7.0, -4.0, (5.0, -3.0, 2.0))])
def test_a_known_tilt_and_shift_is_recovered_within_1_degree_and_1_mm(symmetric_skull: np.ndarray, yaw: float, roll: float, shift: tuple) -> None:
    shape = np.array(symmetric_skull.shape)
    centre = (shape - 1) / 2 * SPACING
    rot = _rotation(yaw, roll)
    t = np.asarray(shift)
    # moved(p) = skull(rot^-1 (p - centre - t) + centre), in mm; ndimage wants output index -> input index
    matrix = rot.T
    offset = (centre - rot.T @ (centre + t)) / SPACING
    moved = ndimage.affine_transform(symmetric_skull.astype(np.float32), matrix, offset=offset, order=1) > 0.5
    # an oblique affine (a rotation about z of 20 degrees, world = RAS-like) checks the map to world mm too
    world_rot = _rotation(20.0, 0.0) @ np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = world_rot * SPACING
    affine[:3, 3] = [10.0, -20.0, 5.0]

    plane = mid_sagittal_plane(moved, affine)

    # truth: the mid-plane x = centre_x, moved by the rigid map, then into world mm
    n_true = world_rot @ (rot @ np.array([1.0, 0.0, 0.0]))
    p_true = world_rot @ (centre + t) + affine[:3, 3]
    angle = math.degrees(math.acos(min(1.0, abs(float(n_true @ plane.normal)))))
    print(f"angle {angle:.3f} deg, distance {float(plane.signed_distance(p_true[None])[0]):+.3f} mm")
    assert angle < 1.0
    assert abs(float(plane.signed_distance(p_true[None])[0])) < 1.0


def test_plane_reflection() -> None:
    plane = Plane(normal=np.array([1.0, 0.0, 0.0]), offset=2.0)
    pts = np.array([[5.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    np.testing.assert_allclose(plane.reflect(pts), [[-1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    h = np.c_[pts, np.ones(2)] @ plane.reflection_matrix().T
    np.testing.assert_allclose(h[:, :3], plane.reflect(pts))
