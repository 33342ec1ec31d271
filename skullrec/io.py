"""Reading and writing binary skull volumes (NIfTI via nibabel, NRRD and DICOM series via SimpleITK).

Every volume in skullrec is a :class:`Volume`: a 3D array indexed (i, j, k) like nibabel's
``get_fdata()`` plus a 4x4 voxel-to-world affine in **RAS+ millimetres** (NIfTI's convention).
NRRD files come in ITK's LPS world space; :func:`read_volume` converts them so that a NRRD and
the NIfTI written from it describe the same physical points.

**One canonical voxel order.** Files store the same head in any of 48 axis orders / flips, and
the model, the crop and the defect geometry all assume one: SkullFix's, array axis 0 towards the
patient's left, axis 1 posterior, axis 2 superior (nibabel axis codes ``L, P, S``,
:data:`CANONICAL_AXCODES`). :func:`read_volume` brings every volume to that order with nibabel's
orientation tools (only permutations and flips of whole axes, so no voxel is resampled); an oblique
grid gets the closest axis order and keeps its tilt in the affine. The volume remembers its
:class:`SourceGrid`, and :func:`write_volume` / :func:`to_source_grid` put results back onto the
input's own voxel order, affine and header exactly.

A DICOM series is a folder of slice files (:func:`is_dicom_folder`); :func:`read_volume` reads it
with SimpleITK's ``ImageSeriesReader`` (rescale slope/intercept applied, so a CT comes back in HU)
through the same canonical-orientation path, so an oblique series keeps its tilt in the affine.

User mistakes (missing file, corrupt gzip, 4D data, NaN, non-binary values, ...) raise
:class:`InputError` with a one-line message that names the file; the CLI prints it and exits 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import InputError, one_line
from .nrrd_header import check_attached_size, check_data_files, read_nrrd_header

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES

# ITK's world space is LPS, NIfTI's is RAS: flipping the first two world axes converts between them.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Warnings (not errors) go through logging: printed as the bare message on stderr unless configured.
_log = logging.getLogger("skullrec")

# The voxel order every Volume is read into (SkullFix's: axis 0 -> left, 1 -> posterior, 2 -> superior).
CANONICAL_AXCODES = ("L", "P", "S")



@dataclass(frozen=True)
class SourceGrid:
    """The grid a volume was stored on before :func:`read_volume` reoriented it to :data:`CANONICAL_AXCODES`.

    Attributes:
        shape: the file's array shape.
        affine: the file's voxel-to-world affine (RAS+ mm).
        ornt: nibabel orientation transform (3, 2) from the file's voxel order to the canonical one
            (identity rows ``[[0, 1], [1, 1], [2, 1]]`` when the file already is canonical).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray
    oriented: bool = True  # False: a NIfTI with qform and sform codes 0 (its voxel order taken as canonical)

    @property
    def is_canonical(self) -> bool:
        """True when the file's voxel order already is the canonical one (nothing was permuted or flipped)."""
        return bool(np.array_equal(self.ornt, _IDENTITY_ORNT))


_IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


@dataclass
class Volume:
    """A 3D volume and where it lives in space.

    Attributes:
        data: array of shape (X, Y, Z); uint8 {0, 1} for masks, float for raw images. Volumes from
            :func:`read_volume` are in the canonical voxel order (:data:`CANONICAL_AXCODES`).
        affine: (4, 4) voxel index -> RAS+ mm (of ``data`` as it is, i.e. of the canonical order).
        header: the NIfTI header the volume was read with (None for NRRD); written back by
            :func:`write_nifti` so that outputs keep the input's header fields.
        path: where it was read from (None for volumes built in memory).
        source: the file's own grid (None for volumes built in memory: their grid is their own);
            :func:`write_volume` writes results back onto it.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = field(default=None, compare=False)
    source: SourceGrid | None = field(default=None, compare=False)

    def like(self, data: np.ndarray) -> "Volume":
        """A volume with new ``data`` (same shape) on this volume's grid, header, path and source grid."""
        data = np.asarray(data)
        if data.shape != self.data.shape:
            raise ValueError(f"Volume.like: shape {data.shape} differs from {self.data.shape}")
        return Volume(data=data, affine=self.affine, header=self.header, path=self.path, source=self.source)

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


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, SourceGrid]:
    """Reorient ``data`` (on ``affine``) to :data:`CANONICAL_AXCODES`: (data, affine, source grid).

    Only whole-axis permutations and flips (nibabel.orientations), so voxel values are untouched
    and the result describes the same physical points; for an oblique affine the closest axis
    order is taken and the remaining tilt stays in the returned affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(n) for n in data.shape[:3])
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(CANONICAL_AXCODES)
    )
    source = SourceGrid(shape=shape, affine=affine.copy(), ornt=ornt)
    if source.is_canonical:
        return data, affine, source
    out = nib.orientations.apply_orientation(data, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return out, new_affine, source


def to_source_grid(data: np.ndarray, source: SourceGrid | None) -> np.ndarray:
    """Undo :func:`to_canonical`: canonical-order ``data`` back in the file's own voxel order (a copy).

    The copy is Fortran-ordered, the order NIfTI stores voxels in, so nibabel writes it without a
    transposition (a Fortran-ordered ``data`` is copied as it lies).
    """
    data = np.asarray(data)
    if source is None or source.is_canonical:
        return np.array(data, order="F")
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(CANONICAL_AXCODES), _ornt_of_source(source))
    out = np.array(nib.orientations.apply_orientation(data, back), order="F")
    if out.shape[:3] != source.shape:  # a wrong-shaped array would be written on the wrong grid
        raise ValueError(f"to_source_grid: shape {out.shape} does not match the source grid {source.shape}")
    return out


def _ornt_of_source(source: SourceGrid) -> np.ndarray:
    """The file's own orientation (the one :func:`to_canonical` started from), recovered from the transform."""
    return nib.orientations.io_orientation(source.affine)


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

    DICOM: a ``folder`` that is itself a DICOM series folder is one case (its name is the case id);
    otherwise each subfolder holding DICOM files is one case named after the subfolder.

    Raises InputError for a missing folder, a file given instead of a folder, an unreadable or
    empty folder, or two files with the same case id. Other files are skipped with one warning
    that lists them (hidden files and detached NRRD data, ``.raw[.gz]``, silently).
    """
    folder = Path(folder)
    if folder.is_file():
        raise InputError(f"{folder}: is a file; give the folder that holds the volume files")
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if is_dicom_folder(folder):
        return {folder.name: folder}
    cases: dict[str, Path] = {}
    skipped: list[str] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"{folder}: cannot read this folder ({exc.strerror or exc})") from None
    for p in entries:
        if p.is_dir() and not p.name.startswith(".") and is_dicom_folder(p):
            if p.name in cases:
                raise InputError(f"{p}: case id '{p.name}' also used by {cases[p.name].name}")
            cases[p.name] = p
        elif p.is_file() and is_volume_file(p):
            cid = case_id(p)
            if cid in cases:
                raise InputError(f"{p}: case id '{cid}' also used by {cases[cid].name}")
            cases[cid] = p
        elif p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith((".raw", ".raw.gz")):
            skipped.append(p.name)
    if skipped and cases:
        shown = one_line(", ".join(skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        _log.warning(f"warning: {folder}: skipped {len(skipped)} file(s) of unsupported type: {shown} "
                     f"(reading {', '.join(VOLUME_SUFFIXES)})")
    if not cases:
        raise InputError(f"{folder}: no volume files (.nii, .nii.gz, .nrrd) or DICOM series folders in this folder")
    return dict(sorted(cases.items()))


# The most voxels (and decoded bytes) one volume may have. Checked from the header, before any
# voxel is read, so a tiny file whose header claims 1500^3 voxels costs nothing. 2^29 voxels is
# e.g. 1024 x 1024 x 512, four times a 512 x 512 x 512 scan and 5-10x a SkullFix skull
# (512 x 512 x 211-394); processing needs several float32 copies, so this is also about the most
# a 16-32 GB machine handles.
MAX_VOXELS = 2**29
MAX_BYTES = 2 * 2**30


def check_size(path: str | Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a volume whose header claims more than :data:`MAX_VOXELS` voxels or :data:`MAX_BYTES` bytes."""
    n = 1
    for s in shape:
        n *= max(int(s), 0)
    shown = " x ".join(str(int(s)) for s in shape)
    if n > MAX_VOXELS or n * itemsize > MAX_BYTES:
        raise InputError(
            f"{path}: header claims {shown} voxels ({n * itemsize / 2**30:.1f} GiB); "
            f"the limit is {MAX_VOXELS:,} voxels and {MAX_BYTES / 2**30:g} GiB per volume"
        )


def _check_gzip(path: Path, limit: int | None = None) -> int:
    """Decode a gzip file (in 4 MB pieces) so that truncation is reported as such; returns the decoded size.

    With ``limit``, decoding stops once that many bytes came out: a header's data size bounds the
    work, so a small file that inflates far beyond what its header needs is not decoded to the end.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while (limit is None or total < limit) and (chunk := f.read(1 << 22)):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return total


class _Collect(logging.Handler):
    """A logging handler that keeps the messages it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def _nifti_header(path: Path) -> tuple[Any, list[str]]:
    """(the image with only its header read (nibabel reads voxels lazily), nibabel's notes on fixing the header).

    nibabel logs the header fields it repairs while loading (e.g. "pixdim[1,2,3] should be
    non-zero; setting 0 dims to 1") straight to stderr; they are collected instead, so that a refused
    file still gives one error line and a read one gives them as warnings naming the file.
    """
    logger = nib.imageglobals.logger
    collect = _Collect()
    handlers, propagate = list(logger.handlers), logger.propagate
    for h in handlers:
        logger.removeHandler(h)
    logger.addHandler(collect)
    logger.propagate = False
    try:
        return nib.load(str(path)), collect.messages
    except Exception as exc:  # nibabel raises many types for broken files
        # nibabel's messages can span lines ("...from \n - could the file be damaged?"); keep one line.
        detail = " ".join(str(exc).split())
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {detail})") from None
    finally:
        logger.removeHandler(collect)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate = propagate


# Scaled NIfTI masks are binarised this many voxels at a time (8 MiB of float64 per slab).
_SCALE_CHUNK = 1 << 20

# The most the voxel axes of an affine may be off perpendicular (|cos| of the angle between two
# axes, about 0.006 degrees). Float32 rounding of a stored sform is about 1e-7; a sheared grid (e.g.
# an uncorrected gantry tilt) is far above.
MAX_SHEAR_COS = 1e-4


def _stored_pixdim(path: Path, img: Any) -> np.ndarray:
    """pixdim[1:4] as stored in the file (nibabel's load quietly replaces a 0 with 1 mm)."""
    with nib.openers.ImageOpener(path) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def _read_nifti(path: Path, *, mask: bool = True) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header, tuple[Any, Any] | None]:
    """(voxels, RAS affine, header, scaling): ``scaling`` is (slope, inter) when the voxels were left unscaled for a mask.

    A scaled file read as a mask stays in its stored type (a uint8 file is not turned into float64,
    8 bytes per voxel); :func:`_scaled_to_mask` applies nibabel's scaling a slab at a time.
    """
    img, notes = _nifti_header(path)
    hdr = img.header
    stored = np.dtype(hdr.get_data_dtype())
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    scaled = not (slope == 1.0 and inter == 0.0)
    # The size of what is actually allocated: the stored type, or float64 for a scaled non-mask read.
    check_size(path, img.shape, stored.itemsize if mask or not scaled else max(stored.itemsize, 8))
    if int(hdr["sform_code"]) == 0:
        # Without an sform the geometry comes from pixdim; nibabel turns a 0 into 1 mm (with a log
        # line only), which would place and size the volume wrongly. NRRD zero spacing is refused too.
        pixdim = _stored_pixdim(path, img)
        bad = [i for i in range(3) if not (np.isfinite(pixdim[i]) and pixdim[i] != 0)]
        if bad:
            shown = ", ".join(f"{float(v):g}" for v in pixdim)
            raise InputError(f"{path}: voxel size (pixdim) {shown} is zero or not finite along axis {bad[0]} "
                             "and no sform gives the geometry; refusing to assume 1 mm")
    # The image's own header has its offset reset for writing; the array proxy keeps the file's.
    offset = int(getattr(proxy, "offset", hdr.get_data_offset()))
    needed = offset + int(np.prod(img.shape, dtype=np.int64)) * stored.itemsize
    have = _check_gzip(path, limit=needed) if path.name.lower().endswith(".gz") else path.stat().st_size
    if have < needed:
        # Refuse before allocating: nibabel would allocate the whole claimed array, then fail.
        raise InputError(f"{path}: truncated: the header needs {needed:,} bytes of data, the file holds {have:,}")
    try:
        data = np.asanyarray(proxy.get_unscaled() if mask and scaled else proxy)
    except Exception as exc:  # nibabel raises many types for broken files
        detail = " ".join(str(exc).split())
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {detail})") from None
    header = img.header.copy()
    affine = np.asarray(img.affine, dtype=np.float64)
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        # No orientation stored: the voxel order is taken as the canonical (SkullFix's) one rather
        # than nibabel's fallback (axes L, A, S), which would reverse axis 1. The shipped SkullBreak
        # sample is such a file, and of its 48 orders the stored one overlaps SkullFix heads best
        # (benchmarks/skullbreak_orientation.py; numbers in docs/explanation/data.md).
        # Outputs keep codes 0 (write_nifti), so they overlay the input wherever it is shown.
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
        affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
        _log.warning(f"warning: {path}: the header stores no orientation (qform and sform codes 0); "
                     "its voxel order is taken as SkullFix's (axis 0 left, 1 posterior, 2 superior)")
    for note in notes:  # the file was read: nibabel's repairs are worth knowing
        _log.warning(f"warning: {path}: nibabel: {note}")
    return data, affine, header, ((slope, inter) if mask and scaled else None)


def _scaled_to_mask(raw: np.ndarray, slope: Any, inter: Any, *, threshold: float | None, source: Path) -> np.ndarray:
    """:func:`to_mask` of ``raw * slope + inter`` computed as nibabel scales (same dtype, same values), a slab at a time.

    Only one slab of :data:`_SCALE_CHUNK` voxels is ever held as floats, so a scaled uint8 mask
    costs its own bytes plus the uint8 result, not a float64 copy of the volume.
    """
    slope, inter = np.asanyarray(slope), np.asanyarray(inter)
    if np.can_cast(inter, slope.dtype):  # as nibabel's ArrayProxy does before scaling
        inter = inter.astype(slope.dtype)
    if not (raw.flags.c_contiguous or raw.flags.f_contiguous):
        raw = np.ascontiguousarray(raw)
    out = np.empty(raw.shape, np.uint8, order="F" if raw.flags.f_contiguous and not raw.flags.c_contiguous else "C")
    flat_raw, flat_out = raw.reshape(-1, order="A"), out.reshape(-1, order="A")  # views, same element order
    for start in range(0, flat_raw.size, _SCALE_CHUNK):
        part = nib.volumeutils.apply_read_scaling(flat_raw[start:start + _SCALE_CHUNK], slope, inter)
        flat_out[start:start + _SCALE_CHUNK] = to_mask(part, threshold=threshold, source=source)
    return out


def _read_nrrd(path: Path, *, detached_data: bool = True) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    """(voxels (x, y, z) as a view of the image's buffer, RAS affine, the image that owns the buffer).

    The header is parsed and every data file it names is checked (:mod:`skullrec.nrrd_header`)
    before SimpleITK sees the file: SimpleITK would follow ``data file: ../../etc/passwd``, block on
    a FIFO and read ``/dev/zero``. ``detached_data=False`` refuses any separate data file.
    """
    header = read_nrrd_header(path)
    check_size(path, header.sizes, header.itemsize)
    check_data_files(path, header, allow_detached=detached_data)
    check_attached_size(path, header, path.stat().st_size)
    try:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("NrrdImageIO")  # no other reader may claim the file by its content
        reader.SetFileName(os.path.abspath(path))  # NrrdIO joins data file names to this folder, as checked
        reader.ReadImageInformation()  # the header only
        pixel = sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).dtype
        check_size(path, tuple(reader.GetSize()), pixel.itemsize * max(reader.GetNumberOfComponents(), 1))
        img = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise InputError(f"{path}: not a readable NRRD file ({first})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a scalar 3D volume, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    if img.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D volume, got {img.GetDimension()}D")
    # SimpleITK arrays are (z, y, x); transpose to (x, y, z) = ITK index order, like nibabel. The
    # transposed array is Fortran-ordered (as NIfTI stores voxels) and is kept so: a C-ordered copy of
    # a 512^3 volume costs a slow transposition here and another one when a result is written.
    # A view, not a copy: read_volume's binarisation makes the one copy (mask=False copies it there);
    # the view does not keep the image alive, so the image is returned for the caller to hold until then.
    data = sitk.GetArrayViewFromImage(img).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return data, affine, img


# ----------------------------------------------------------------------------------------------
# DICOM series (a folder of slice files), read with SimpleITK / GDCM

# Bytes 128-131 of a DICOM Part 10 file ("DICM" after the 128-byte preamble).
_DICOM_MAGIC_OFFSET = 128
# How many files of a folder are probed for the DICOM magic before it is taken for a non-DICOM folder.
_DICOM_PROBE_FILES = 32
# A regular stack of slices: neighbouring slices' gaps within this fraction of the median gap
# (ImagePositionPatient is often written with 2-3 decimals, ~1-2% of a 0.5 mm gap), the whole stack
# within half a gap of its length, and no slice shifted sideways by half a pixel from the first
# (a gantry tilt drifts steadily; rounding does not add up). Beyond that ITK would misplace voxels.
_SLICE_GAP_TOLERANCE = 0.1


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def is_dicom_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds DICOM files (Part 10 "DICM" magic in one of its first files, volume files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    probed = 0
    try:
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file() or is_volume_file(p):
                continue
            if _is_dicom_file(p):
                return True
            probed += 1
            if probed >= _DICOM_PROBE_FILES:
                break
    except OSError:
        return False
    return False


@contextlib.contextmanager
def _quiet_itk():
    """ITK prints its warnings (e.g. on slice spacing) straight to stderr; the checks here report them as InputError."""
    was = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(was)


def dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """Map series instance UID -> its slice files (sorted by GDCM along the slice normal) for a DICOM folder."""
    folder = Path(folder)
    try:
        with _quiet_itk():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot list the DICOM series ({_itk_error(exc)})") from None


def _itk_error(exc: BaseException) -> str:
    """The last line of an ITK exception (its first lines are source locations)."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[-1].split()) if text else "unknown error"


def _describe_series(folder: Path, uid: str, files: list[str]) -> str:
    """``UID (N slices, description)`` for error messages listing a folder's series."""
    desc = ""
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(files[0])
        with _quiet_itk():
            r.ReadImageInformation()
        if r.HasMetaDataKey("0008|103e"):
            desc = " ".join(r.GetMetaData("0008|103e").split())
    except RuntimeError:
        pass
    return f"{uid} ({len(files)} slices{', ' + desc if desc else ''})"


def choose_dicom_series(folder: str | Path, series: Collection[str] | str | None = None) -> tuple[str, list[str]]:
    """(UID, files) of the series to read from a DICOM folder.

    A folder with one series gives that one; with several, exactly one of the UIDs in ``series``
    (``--series``) must be among them, else InputError lists the folder's series.
    """
    folder = Path(folder)
    wanted = {series} if isinstance(series, str) else set(series or ())
    found = dicom_series(folder)
    if not found:
        raise InputError(f"{folder}: no readable DICOM series in this folder")
    if len(found) == 1:
        uid = next(iter(found))
        if wanted and uid not in wanted:
            raise InputError(f"{folder}: --series {', '.join(sorted(wanted))} not found; this folder holds {_describe_series(folder, uid, found[uid])}")
        return uid, found[uid]
    picked = [uid for uid in found if uid in wanted]
    if len(picked) == 1:
        return picked[0], found[picked[0]]
    listed = "; ".join(_describe_series(folder, uid, files) for uid, files in found.items())
    if picked:
        raise InputError(f"{folder}: --series names {len(picked)} of this folder's series; give one of: {listed}")
    raise InputError(f"{folder}: {len(found)} DICOM series in this folder; choose one with --series UID: {listed}")


def _read_dicom(folder: Path, series: Collection[str] | str | None = None) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    """(voxels (x, y, z) as a view of the image's buffer, RAS affine, the image) of one DICOM series.

    Every slice's header is read first: the slices must share size, pixel type and orientation and
    lie on a regular grid (evenly spaced along the slice normal, no sideways shift as from a gantry
    tilt), and slice count x rows x cols must pass :func:`check_size`, all before any pixel is read.
    """
    uid, files = choose_dicom_series(folder, series)
    infos = []
    try:
        with _quiet_itk():
            for name in files:
                r = sitk.ImageFileReader()
                r.SetFileName(name)
                r.ReadImageInformation()
                infos.append((tuple(r.GetSize()), r.GetPixelID(), r.GetNumberOfComponents(),
                              np.asarray(r.GetOrigin(), dtype=np.float64), np.asarray(r.GetDirection(), dtype=np.float64),
                              np.asarray(r.GetSpacing(), dtype=np.float64)))
    except RuntimeError as exc:
        raise InputError(f"{folder}: unreadable DICOM file {Path(name).name} ({_itk_error(exc)})") from None
    size, pixel_id, comps = infos[0][:3]
    for (s, pid, c, *_), name in zip(infos, files):
        if (s, pid, c) != (size, pixel_id, comps):
            raise InputError(f"{folder}: mixed series: {Path(name).name} is {'x'.join(map(str, s))} "
                             f"(pixel type {pid}), {Path(files[0]).name} is {'x'.join(map(str, size))} (pixel type {pixel_id})")
    if comps != 1:
        raise InputError(f"{folder}: expected a scalar (grey-value) series, got {comps} components per pixel")
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), pixel_id)).dtype.itemsize
    in_plane = size[:2]
    depth = len(files) if len(files) > 1 else (size[2] if len(size) > 2 else 1)  # one file: maybe multi-frame
    check_size(folder, (*in_plane, depth), itemsize)
    if len(files) > 1:
        _check_slice_grid(folder, files, infos)
    try:
        with _quiet_itk():
            if len(files) > 1:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(files[0])
            img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: unreadable DICOM series {uid} ({_itk_error(exc)})") from None
    if img.GetDimension() != 3:
        raise InputError(f"{folder}: series {uid} is a single {img.GetDimension()}D image, not a 3D volume")
    data = sitk.GetArrayViewFromImage(img).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(img.GetSpacing(), dtype=np.float64))
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(img.GetOrigin(), dtype=np.float64)
    return data, affine, img


def _check_slice_grid(folder: Path, files: list[str], infos: list[tuple]) -> None:
    """Refuse slices that do not form a regular 3D grid: ITK would read them as one and misplace voxels."""
    directions = np.stack([i[4][:9].reshape(3, 3) if i[4].size == 9 else _plane_direction(i[4]) for i in infos])
    if np.abs(directions - directions[0]).max() > 1e-4:
        raise InputError(f"{folder}: mixed series: the slices have different orientations (ImageOrientationPatient)")
    normal = directions[0][:, 2]
    origins = np.stack([i[3][:3] for i in infos])
    steps = np.diff(origins, axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < 1e-6):
        raise InputError(f"{folder}: two slices at the same position (duplicate slices, or several acquisitions in one series)")
    gap = float(np.median(np.abs(along)))
    if (np.abs(np.abs(along) - gap).max() > _SLICE_GAP_TOLERANCE * gap
            or abs(abs(float(along.sum())) - gap * len(along)) > 0.5 * gap):
        raise InputError(f"{folder}: slices are not evenly spaced ({np.abs(along).min():.3g} to {np.abs(along).max():.3g} mm apart; "
                         "missing slices?)")
    offsets = origins - origins[0]
    sideways = np.linalg.norm(offsets - (offsets @ normal)[:, None] * normal, axis=1)
    if sideways.max() > 0.5 * float(min(infos[0][5][:2])):
        raise InputError(f"{folder}: the slices drift sideways by up to {sideways.max():.3g} mm along the stack (gantry tilt); "
                         "resample the series to a regular grid first")


def _plane_direction(direction: np.ndarray) -> np.ndarray:
    """A 2D image's 2x2 direction as the 3x3 of an axial slice (2D DICOM files are read as 3D by GDCM; kept for safety)."""
    out = np.eye(3)
    out[:2, :2] = np.asarray(direction, dtype=np.float64).reshape(2, 2)
    return out


def _check_perpendicular(path: Path, affine: np.ndarray) -> None:
    """Refuse a sheared grid (voxel axes not perpendicular in space).

    Outputs are written on the input's grid, and a NIfTI qform cannot hold a shear: nibabel would
    store the nearest unsheared qform, placing output voxels up to about a voxel per 10 indices away
    from the input's (and viewers that prefer the qform would show that).
    """
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    cos = np.abs(cols.T @ cols - np.eye(3)).max()
    if cos > MAX_SHEAR_COS:
        off = 90.0 - float(np.degrees(np.arccos(min(cos, 1.0))))
        raise InputError(f"{path}: sheared voxel grid (axes {off:.3g} degrees off perpendicular); "
                         "resample it onto a perpendicular grid first (outputs could not keep a shear)")


def read_volume(path: str | Path, *, mask: bool = True, threshold: float | None = None,
                series: Collection[str] | str | None = None, detached_data: bool = True) -> Volume:
    """Read a NIfTI or NRRD file, or a DICOM series folder, as a :class:`Volume`.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` file, or a folder of DICOM slices.
        mask: if True the data must be binary and are returned as uint8 {0, 1}; values other than
            0/1 are an error unless ``threshold`` is given.
        threshold: binarise as ``data > threshold`` (e.g. 0.5 for a probability map).
        series: DICOM only: the series UID(s) to choose from when the folder holds several
            (:func:`choose_dicom_series`).
        detached_data: allow a NRRD header's ``data file`` (only regular files inside the header's
            folder are read); False refuses any (a viewer upload is a lone file).

    Raises:
        InputError: missing/empty/corrupt file, unknown suffix, not 3D, NaN values, non-binary mask,
            a NRRD data file outside the header's folder or not a regular file, a zero NIfTI voxel
            size, a sheared grid.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    dicom = path.is_dir() and is_dicom_folder(path)
    if not dicom and not path.is_file():
        raise InputError(f"{path}: not a file" + (" (and no DICOM files in this folder)" if path.is_dir() else ""))
    if not dicom and path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    name = path.name.lower()
    header = None
    owner = None  # what owns a NRRD's (or DICOM series') voxel buffer: held until the voxels are copied below
    scaling = None  # a scaled NIfTI mask's (slope, inter), applied while binarising
    if dicom:
        data, affine, owner = _read_dicom(path, series)
    elif name.endswith(NIFTI_SUFFIXES):
        data, affine, header, scaling = _read_nifti(path, mask=mask)
    elif name.endswith(NRRD_SUFFIXES):
        data, affine, owner = _read_nrrd(path, detached_data=detached_data)
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
    _check_perpendicular(path, affine)

    if mask and dicom and threshold is None:
        try:
            data = to_mask(data, source=path)
        except InputError as exc:  # a DICOM series is most often a CT: say how to read one
            raise InputError(f"{exc}, or --ct for a CT in HU") from None
    elif scaling is not None:
        data = _scaled_to_mask(data, *scaling, threshold=threshold, source=path)
    elif mask:
        data = to_mask(data, threshold=threshold, source=path)
    else:
        if np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():
            raise InputError(f"{path}: volume contains NaN values")
        data = np.array(data, order="K")  # own the voxels (a NRRD's array is a view of SimpleITK's image)
    del owner  # every branch above made a copy
    data, canon_affine, source = to_canonical(data, affine)
    if header is not None and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        source = dataclasses.replace(source, oriented=False)
    # Fortran order (how both NIfTI and NRRD hold voxels) is kept as it is: same values, no transposition.
    if not (data.flags.c_contiguous or data.flags.f_contiguous):
        data = np.ascontiguousarray(data)
    return Volume(data=data, affine=canon_affine, header=header, path=path, source=source)


def to_mask(data: np.ndarray, *, threshold: float | None = None, source: str | Path = "<array>") -> np.ndarray:
    """Return ``data`` as a uint8 {0, 1} mask; non-binary values need an explicit ``threshold``."""
    if np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():
        raise InputError(f"{source}: volume contains NaN values")
    if threshold is not None:
        return (data > threshold).astype(np.uint8)
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    # np.unique on a 512^3 volume is slow; two comparisons answer "is it binary" much faster, and for
    # integers the range alone does (one pass, no temporary arrays).
    if np.issubdtype(data.dtype, np.integer):
        binary = data.size == 0 or (int(data.min()) >= 0 and int(data.max()) <= 1)
    else:
        binary = bool(np.all((data == 0) | (data == 1)))
    if not binary:
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


def current_umask() -> int:
    """The process umask (reading it needs setting it; it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_public_dir(path: str | Path) -> Path:
    """Give a folder made private by ``tempfile.mkdtemp`` (0700) the mode a plain mkdir would (0777 & ~umask)."""
    path = Path(path)
    os.chmod(path, 0o777 & ~current_umask())
    return path


def exclusive_lock(lock_path: str | Path, busy: str) -> Any:
    """Hold an exclusive OS lock (fcntl.flock) on ``lock_path`` for the life of the returned handle.

    A second holder is refused at once with ``InputError(busy)``. The kernel drops the lock when
    the process ends, even by kill -9, so a stale lock never blocks a later run. After locking,
    the file is checked to still be the one at ``lock_path``: :func:`release_lock` may unlink it,
    and a process that opened the old file just before would otherwise hold a lock nobody sees.
    Returns None where ``fcntl`` is missing (Windows): the caller is then unguarded.
    """
    try:
        import fcntl
    except ImportError:
        return None
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise InputError(busy) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()  # the file was replaced under us: lock the current one
    raise InputError(busy)


def release_lock(handle: Any, lock_path: str | Path | None = None) -> None:
    """Release a lock from :func:`exclusive_lock`; with ``lock_path``, remove the lock file first (still locked)."""
    if handle is None:
        return
    if lock_path is not None:
        Path(lock_path).unlink(missing_ok=True)
    handle.close()


def _atomic_target(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix on the temporary name: nibabel chooses gzip from the file name.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes[-2:]) or ".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give the result the permissions a plain open() would.
    os.chmod(fd, 0o666 & ~current_umask())
    return fd, Path(tmp)


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` when it names no file (a write past ``ulimit -f``: EFBIG) or only a temporary file of it.

    The user knows the file they asked for, not ``.NAME.x7f3.csv``; the message must say which write failed.
    """
    if exc.filename is not None:
        named_file = Path(exc.filename)
        if named_file.parent != path.parent or not named_file.name.startswith(f".{path.name}."):
            return exc
    return OSError(exc.errno, exc.strerror or " ".join(str(exc).split()) or type(exc).__name__, str(path))


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """Remove ``tmp`` if the block fails; an OS error is re-raised naming ``path`` (the file the user asked for)."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _named(exc, path) from None
        raise


def _into_temporary(path: Path, save: Callable[[Path], None]) -> Path:
    """``save(tmp)`` into a new temporary file beside ``path``; returns it (removed again on failure, the error naming ``path``)."""
    try:
        fd, tmp = _atomic_target(path)
    except OSError as exc:
        raise _named(exc, path) from None
    os.close(fd)
    with _removed_on_failure(tmp, path):
        save(tmp)
    return tmp


def _write_temporary(path: Path, payload: bytes) -> Path:
    """``payload`` in a temporary file beside ``path``, flushed to disk; returns it (removed again on failure)."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    return _into_temporary(path, save)


def _save_atomically(path: Path, save: Callable[[Path], None]) -> Path:
    """``save(tmp)`` into a temporary file beside ``path``, then a rename into place; on failure nothing is left behind.

    An OS error names ``path`` (the file the user asked for), not the temporary file.
    """
    tmp = _into_temporary(path, save)
    with _removed_on_failure(tmp, path):
        os.replace(tmp, path)
    return path


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and a rename.

    An OS error names ``path`` (also a write past the file-size limit, which names no file itself).
    """
    path = Path(path)
    tmp = _write_temporary(path, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temporary file, then rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files as one set: afterwards all of them are new, or (on any failure) all are as before.

    Every new file is written to a temporary file first (a full disk or ``ulimit -f`` fails here,
    naming the file, with nothing replaced); then each is renamed into place. The old files stay
    reachable through hard links until the last rename, so a rename that still fails puts the
    earlier ones back (where the file system has no hard links, an old file cannot be put back).
    """
    temps: dict[Path, Path] = {}
    try:
        for path, payload in files.items():
            temps[Path(path)] = _write_temporary(Path(path), payload)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    backups: dict[Path, Path | None] = {}
    placed: list[Path] = []
    try:
        for path in temps:
            if path.exists():
                backups[path] = _hard_link_backup(path)
        for path, tmp in temps.items():
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in placed:  # undo: the old file back, or no file where there was none
            if backups.get(path) is not None:
                os.replace(backups.pop(path), path)
            elif path not in backups:
                path.unlink(missing_ok=True)
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)


def _hard_link_backup(path: Path) -> Path | None:
    """A second name ``.NAME.old-XXXX`` for the existing ``path`` (no copy); None where hard links fail."""
    for _ in range(10):
        backup = path.with_name(f".{path.name}.old-{os.urandom(4).hex()}")
        try:
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some network and FAT file systems)
            return None
    return None


def write_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: type = np.uint8,
    *,
    oriented: bool = True,
) -> Path:
    """Write a 3D array as NIfTI (uint8 by default) atomically: a temporary file, then a rename.

    The given ``header`` (e.g. from the input volume) is kept apart from data type and scaling;
    qform and sform are both set to ``affine`` so that viewers such as 3D Slicer place it correctly
    (``oriented=False``: both codes 0, for results of an input that stored no orientation).
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
    # Keep the input header's qform/sform codes (e.g. 2 = aligned to another scan); 1 (scanner) when unset.
    # An input stored without any orientation gives outputs without one: they overlay it as it is.
    if not oriented:
        img.set_qform(affine, code=0)
        img.set_sform(affine, code=0)
    else:
        qcode = int(hdr["qform_code"]) if hdr is not None and int(hdr["qform_code"]) > 0 else 1
        scode = int(hdr["sform_code"]) if hdr is not None and int(hdr["sform_code"]) > 0 else 1
        img.set_qform(affine, code=qcode)
        img.set_sform(affine, code=scode)
    return _save_atomically(path, lambda tmp: nib.save(img, str(tmp)))


def write_nrrd(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D array as a gzip-compressed uint8 NRRD (SimpleITK) atomically: a temporary file, then a rename.

    ``data`` is indexed (i, j, k) in the file's voxel order and ``affine`` maps it to RAS+ mm; the
    file gets ITK's LPS space directions and origin, so :func:`read_volume` gives back this affine.
    """
    path = Path(path)
    if not path.name.lower().endswith(".nrrd"):
        raise InputError(f"{path}: output must end in .nrrd")
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"write_nrrd expects a 3D array, got shape {arr.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    lps = LPS_TO_RAS @ affine[:3, :3]  # the same flip converts both ways
    spacing = np.linalg.norm(lps, axis=0)
    # SimpleITK arrays are (z, y, x): the transpose of a Fortran-ordered (x, y, z) array is C-ordered, no copy.
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(np.uint8, copy=False).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps / spacing).ravel().tolist())
    img.SetOrigin((LPS_TO_RAS @ affine[:3, 3]).tolist())
    def save(tmp: Path) -> None:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=True)
        except RuntimeError as exc:  # ITK reports a failed write (disk full, ...) as RuntimeError, not OSError
            raise OSError(errno.EIO, f"cannot write the file ({' '.join(str(exc).split())[-200:]})", str(path)) from None

    return _save_atomically(path, save)


def output_suffix(path: str | Path) -> str:
    """The suffix a result for input ``path`` gets: ``.nrrd`` for NRRD inputs (.nrrd, .nhdr), else ``.nii.gz``."""
    return ".nrrd" if Path(path).name.lower().endswith(NRRD_SUFFIXES) else ".nii.gz"


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write a :class:`Volume` as uint8 NIfTI or NRRD (by ``path``'s suffix) on its file's own grid.

    A volume read by :func:`read_volume` is held in the canonical order; writing it goes back to
    the grid it came from (voxel order, affine; a NIfTI also keeps the header), so an output
    overlays its input voxel for voxel in any viewer. Volumes built in memory (``source`` None)
    are written as they are.
    """
    data, affine = volume.data, volume.affine
    if volume.source is not None:
        data, affine = to_source_grid(volume.data, volume.source), volume.source.affine
    if Path(path).name.lower().endswith(".nrrd"):
        return write_nrrd(path, data, affine)
    if volume.source is None:
        return write_nifti(path, data, affine, volume.header)
    return write_nifti(path, data, affine, volume.header, oriented=volume.source.oriented)
