"""CT-like test inputs: HU volumes made from a binary skull, and DICOM series of them written with SimpleITK.

Imported by the CT/DICOM tests (``from ct_helpers import ...``; tests/ is on sys.path like conftest).
"""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# A DICOM UID root for test data (the "2.25" UUID-derived arc needs no registration).
UID_ROOT = "2.25.1234567"


def defective_shell(shape: tuple[int, int, int], radii: tuple[float, float, float], inner: float,
                    cut: tuple[slice, slice, slice]) -> np.ndarray:
    """An ellipsoidal shell (index space, centred; ``inner`` = inner/outer radius ratio) with the block ``cut`` removed (the defect)."""
    g = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt(sum((x / rr) ** 2 for x, rr in zip(g, radii)))
    skull = (r <= 1) & (r >= inner)
    skull[cut] = False
    return skull


def ct_from_skull(skull: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A CT-like HU volume (int16) of a binary skull: bone 700-1800 HU, soft tissue 0-80 HU around and
    inside it, air -1000 outside, plus scanner noise (SD 20 HU)."""
    from scipy import ndimage

    skull = np.asarray(skull, dtype=bool)
    # The head: the skull with everything it encloses and a few voxels of scalp around it.
    head = ndimage.binary_dilation(ndimage.binary_fill_holes(ndimage.binary_closing(skull, iterations=3)) | skull, iterations=3)
    hu = np.full(skull.shape, -1000.0)
    hu[head] = rng.uniform(0, 80, int(head.sum()))
    hu[skull] = rng.uniform(700, 1800, int(skull.sum()))
    hu += rng.normal(0, 20, skull.shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about world axis 'x', 'y' or 'z'."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    direction: np.ndarray | None = None,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    uid: str = UID_ROOT + ".1",
    description: str = "test CT",
    positions: np.ndarray | None = None,
) -> list[Path]:
    """Write ``hu`` (x, y, z) as a DICOM CT series, one file per slice k = hu[:, :, k].

    ``direction`` (3x3, LPS, columns = directions of array axes 0, 1, 2) and ``origin`` (LPS mm) set
    ImageOrientationPatient and ImagePositionPatient (slice k at origin + k * spacing[2] * direction[:, 2]
    unless ``positions`` gives each slice's position); PixelSpacing and SliceThickness from ``spacing``.
    SimpleITK's writer stores (HU - intercept) / slope, so with slope 2, intercept -1024 the file holds
    (HU + 1024) / 2 and RescaleSlope/RescaleIntercept say how to get HU back; ``hu`` must be such that
    this is a whole number.
    """
    # GDCM's writer sets the C locale for the whole process (LC_ALL=C), which turns Python's default
    # text encoding into ASCII for every later test; put the caller's locale back.
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_slices(folder, hu, spacing, direction, origin, slope, intercept, uid, description, positions)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(folder, hu, spacing, direction, origin, slope, intercept, uid, description, positions) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    written = []
    for k in range(hu.shape[2]):
        sl = sitk.GetImageFromArray(np.ascontiguousarray(hu[:, :, k].T.astype(np.int16)))
        sl.SetSpacing((float(spacing[0]), float(spacing[1])))
        pos = np.asarray(origin, dtype=np.float64) + d[:, 2] * spacing[2] * k if positions is None else positions[k]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": f"{uid}.0",
            "0020|000e": uid,
            "0008|103e": description,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.8f}" for v in [*d[:, 0], *d[:, 1]]),
            # PixelSpacing is row spacing (between rows, along axis 1) then column spacing (axis 0).
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1053": f"{slope:g}",
            "0028|1052": f"{intercept:g}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        path = folder / f"slice{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        written.append(path)
    return written


def stored_pixels(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The raw stored pixel values (int16, (x, y)) of an uncompressed slice file: its last x*y*2 bytes."""
    nx, ny = shape
    raw = path.read_bytes()[-nx * ny * 2 :]
    return np.frombuffer(raw, "<i2").reshape(ny, nx).T
