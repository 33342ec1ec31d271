"""Reading and writing binary skull volumes (NIfTI via nibabel, NRRD via SimpleITK).

Every volume in skullrec is a :class:`Volume`: a 3D array indexed (i, j, k) like nibabel's
``get_fdata()`` plus a 4x4 voxel-to-world affine in **RAS+ millimetres** (NIfTI's convention).
NRRD files come in ITK's LPS world space; :func:`read_volume` converts them so that a NRRD and
the NIfTI written from it describe the same physical points.

User mistakes (missing file, corrupt gzip, 4D data, NaN, non-binary values, ...) raise
:class:`InputError` with a one-line message that names the file; the CLI prints it and exits 2.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES

# ITK's world space is LPS, NIfTI's is RAS: flipping the first two world axes converts between them.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])



@dataclass
class Volume:
    """A 3D volume and where it lives in space.

    Attributes:
        data: array of shape (X, Y, Z); uint8 {0, 1} for masks, float for raw images.
        affine: (4, 4) voxel index -> RAS+ mm.
        header: the NIfTI header the volume was read with (None for NRRD); written back by
            :func:`write_nifti` so that outputs keep the input's header fields.
        path: where it was read from (None for volumes built in memory).
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return affine_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis of a 4x4 affine (its column norms)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def case_id(path: str | Path) -> str:
    """The case id of a volume file: its name without the volume suffix (``012.nii.gz`` -> ``012``)."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_volume_file(path: str | Path) -> bool:
    """True for files with a supported volume suffix."""
    return Path(path).name.lower().endswith(VOLUME_SUFFIXES)


def list_volumes(folder: str | Path) -> dict[str, Path]:
    """Map case id -> file for every volume file in ``folder`` (not recursive), sorted by id.

    Raises InputError for a missing folder, an empty one, or two files with the same case id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    cases: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_volume_file(p):
            cid = case_id(p)
            if cid in cases:
                raise InputError(f"{p}: case id '{cid}' also used by {cases[cid].name}")
            cases[cid] = p
    if not cases:
        raise InputError(f"{folder}: no volume files (.nii, .nii.gz, .nrrd) in this folder")
    return dict(sorted(cases.items()))


def _check_gzip(path: Path) -> None:
    """Read a gzip file to the end so that truncation is reported as such, not as a numpy error."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    if path.name.lower().endswith(".gz"):
        _check_gzip(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        # nibabel's messages can span lines ("...from \n - could the file be damaged?"); keep one line.
        detail = " ".join(str(exc).split())
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {detail})") from None
    header = img.header.copy()
    return data, np.asarray(img.affine, dtype=np.float64), header


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.name.lower().endswith(".nrrd"):
        try:
            with open(path, "rb") as f:
                if not f.read(4) == b"NRRD":
                    raise InputError(f"{path}: not a NRRD file (missing 'NRRD' magic)")
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise InputError(f"{path}: not a readable NRRD file ({first})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a scalar 3D volume, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    if img.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D volume, got {img.GetDimension()}D")
    # SimpleITK arrays are (z, y, x); transpose to (x, y, z) = ITK index order, like nibabel.
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return data, affine


def read_volume(path: str | Path, *, mask: bool = True, threshold: float | None = None) -> Volume:
    """Read a NIfTI or NRRD file as a :class:`Volume`.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` file.
        mask: if True the data must be binary and are returned as uint8 {0, 1}; values other than
            0/1 are an error unless ``threshold`` is given.
        threshold: binarise as ``data > threshold`` (e.g. 0.5 for a probability map).

    Raises:
        InputError: missing/empty/corrupt file, unknown suffix, not 3D, NaN values, non-binary mask.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    name = path.name.lower()
    header = None
    if name.endswith(NIFTI_SUFFIXES):
        data, affine, header = _read_nifti(path)
    elif name.endswith(NRRD_SUFFIXES):
        data, affine = _read_nrrd(path)
    else:
        raise InputError(f"{path}: unknown file type (expected one of {', '.join(VOLUME_SUFFIXES)})")

    # A trailing singleton 4th axis (X, Y, Z, 1) is common and harmless; anything else is not 3D.
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise InputError(f"{path}: volume too small, shape {tuple(data.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: invalid (singular or non-finite) voxel-to-world affine")

    if mask:
        data = to_mask(data, threshold=threshold, source=path)
    elif np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():
        raise InputError(f"{path}: volume contains NaN values")
    return Volume(data=np.ascontiguousarray(data), affine=affine, header=header, path=path)


def to_mask(data: np.ndarray, *, threshold: float | None = None, source: str | Path = "<array>") -> np.ndarray:
    """Return ``data`` as a uint8 {0, 1} mask; non-binary values need an explicit ``threshold``."""
    if np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():
        raise InputError(f"{source}: volume contains NaN values")
    if threshold is not None:
        return (data > threshold).astype(np.uint8)
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    # np.unique on a 512^3 volume is slow; two comparisons answer "is it binary" much faster.
    if not np.all((data == 0) | (data == 1)):
        values = np.unique(data[(data != 0) & (data != 1)])[:5]
        shown = ", ".join(f"{v:g}" for v in values.astype(np.float64))
        raise InputError(
            f"{source}: mask has values other than 0 and 1 (e.g. {shown}); pass --threshold T to binarise"
        )
    return data.astype(np.uint8)


def json_default(obj: object) -> object:
    """``json.dumps(default=...)`` for numpy scalars/arrays, one-element tensors and paths."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars and one-element torch tensors
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _atomic_target(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix on the temporary name: nibabel chooses gzip from the file name.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes[-2:]) or ".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(fd, 0o666 & ~umask)
    return fd, Path(tmp)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temporary file, then rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: type = np.uint8,
) -> Path:
    """Write a 3D array as NIfTI (uint8 by default) atomically: a temporary file, then a rename.

    The given ``header`` (e.g. from the input volume) is kept apart from data type and scaling;
    qform and sform are both set to ``affine`` so that viewers such as 3D Slicer place it correctly.
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{path}: output must end in .nii or .nii.gz")
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"write_nifti expects a 3D array, got shape {arr.shape}")
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(arr.astype(dtype, copy=False), np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write a :class:`Volume` as uint8 NIfTI, keeping its affine and header."""
    return write_nifti(path, volume.data, volume.affine, volume.header)
