"""The pure helpers the Streamlit viewer page is built from.

The page only lays out widgets; everything that can be tested without a browser lives here:
finding cases and checkpoints, validating uploads, meshes for the 3D view, coloured slice
overlays, metric rows with units, download payloads and the results-CSV browser.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..data.layout import implant_of
from ..errors import InputError, one_line
from ..io import Volume, case_id, is_volume_file, list_volumes, read_volume

DEFAULT_RESULTS_ROOT = Path("results")
DEFAULT_MAX_UPLOAD_MB = 256
# Uploads are single files; .nhdr needs a separate data file, so it cannot be uploaded alone.
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
# Only safetensors: checkpoint.py never writes (or loads) pickled model files.
CHECKPOINT_SUFFIXES = (".safetensors",)

# Display colours (RGB 0-255). The implant is orange-red against ivory bone so it stands out in
# both the 3D view and the slices; reconstruction blue and truth green are the usual pred/GT pair.
COLOURS: dict[str, tuple[int, int, int]] = {
    "defective": (225, 215, 190),
    "implant": (240, 80, 30),
    "reconstruction": (60, 120, 230),
    "truth": (40, 180, 80),
    "truth_implant": (200, 40, 200),
}
LABELS = {
    "defective": "Defective skull",
    "implant": "Implant (predicted)",
    "reconstruction": "Reconstruction",
    "truth": "Ground truth",
    "truth_implant": "Implant (ground truth)",
}
AXES = {"x (sagittal)": 0, "y (coronal)": 1, "z (axial)": 2}


# --------------------------------------------------------------------------------------------
# cases and checkpoints
# --------------------------------------------------------------------------------------------


def discover_cases(root: str | Path) -> dict[str, list[str]]:
    """Map split -> case ids (those with a defective skull) of a data set; empty if ROOT is missing."""
    from ..data.layout import splits_in

    root = Path(root)
    out: dict[str, list[str]] = {}
    for split in splits_in(root):
        try:
            out[split] = list(list_volumes(root / split / "defective"))
        except InputError:
            continue  # an empty split folder is not worth an error in a browser
    return out


# Held-out splits, in the order the default case is taken from: a model has not seen them in training.
HELD_OUT_PREFIXES = ("eval", "test", "val")


def default_split(splits: list[str]) -> int:
    """Index of the split whose first case the viewer opens: the first held-out one (``eval_*``, then
    ``test*``, ``val*``), not a training split the model has seen; 0 when there is none."""
    for prefix in HELD_OUT_PREFIXES:
        for i, name in enumerate(splits):
            if name.lower().startswith(prefix):
                return i
    return 0


@dataclass
class CaseVolumes:
    """One case to show: the defective skull and, when known, the complete skull and implant."""

    name: str
    defective: Volume
    complete: Volume | None = None
    implant: Volume | None = None


def _find_volume(folder: Path, cid: str) -> Path | None:
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_volume_file(p) and case_id(p) == cid:
            return p
    return None


def load_case(root: str | Path, split: str, cid: str) -> CaseVolumes:
    """Read one case of a data set in the project's layout (complete/implant when present)."""
    folder = Path(root) / split
    defective_path = _find_volume(folder / "defective", cid)
    if defective_path is None:
        raise InputError(f"{folder / 'defective'}: no case '{cid}'")
    defective = read_volume(defective_path)
    complete = implant = None
    complete_path = _find_volume(folder / "complete", cid)
    if complete_path is not None:
        complete = read_volume(complete_path)
        if complete.shape != defective.shape:
            raise InputError(f"{complete_path}: shape {complete.shape} differs from the defective skull {defective.shape}")
        implant_path = _find_volume(folder / "implant", cid)
        # The layout defines implant = complete AND NOT defective; derive it when the file is absent.
        implant = read_volume(implant_path) if implant_path is not None else Volume(
            implant_of(complete.data, defective.data).astype(np.uint8), complete.affine, complete.header
        )
    return CaseVolumes(name=f"{split}/{cid}", defective=defective, complete=complete, implant=implant)


def find_case(root: str | Path, cid: str, split: str | None = None) -> tuple[str, str] | None:
    """Locate case ``cid`` in a data set (in ``split`` if given, else the first split holding it)."""
    cases = discover_cases(root)
    cid = str(cid)
    candidates = [split] if split else list(cases)
    for s in candidates:
        ids = cases.get(s, [])
        if cid in ids:
            return s, cid
        # CSV readers turn "003" into 3: match zero-padded ids numerically as well.
        if cid.isdigit():
            for i in ids:
                if i.isdigit() and int(i) == int(cid):
                    return s, i
    return None


def discover_checkpoints(roots: str | Path | tuple[Path, ...] | list[Path], max_depth: int = 6) -> dict[str, Path]:
    """Map label -> path for every checkpoint file (``*.safetensors``) under the run folder(s).

    Labels are the paths relative to the common parent of ``roots`` (e.g. ``runs/baseline/...``),
    sorted; folders starting with a dot (staging folders of runs being written) are skipped.
    """
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    found: dict[str, Path] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if len(rel.parts) > max_depth or any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_file() and p.name.lower().endswith(CHECKPOINT_SUFFIXES):
                found.setdefault((Path(root.name) / rel).as_posix(), p)
    return dict(sorted(found.items()))


SHIPPED_LABEL = "shipped: stage 1 + stage 2 (skullrec/weights/)"


def checkpoint_choices(roots: str | Path | tuple[Path, ...] | list[Path]) -> dict[str, tuple[Path, Path | None]]:
    """Label -> (stage-1 checkpoint, stage-2 checkpoint or None): the shipped pair first (when
    ``skullrec/weights/`` holds it, :mod:`skullrec.inference.shipped`), then every checkpoint under ``roots``
    (:func:`discover_checkpoints`) as stage 1 alone."""
    from ..inference.shipped import shipped_checkpoints

    choices: dict[str, tuple[Path, Path | None]] = {}
    try:
        s1, s2 = shipped_checkpoints()
        choices[SHIPPED_LABEL] = (s1, s2)
    except InputError:
        pass  # no shipped weights in this installation: the run folders only
    for label, path in discover_checkpoints(roots).items():
        choices[label] = (path, None)
    return choices


def discover_results(root: str | Path = DEFAULT_RESULTS_ROOT, max_depth: int = 3) -> list[Path]:
    """Per-case results CSVs under ``root``: those whose header has a case-id column
    (``skullrec experiment``'s per_case.csv, ``skullrec evaluate``'s CSV; not table2.csv)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*.csv")):
        rel = p.relative_to(root)
        if len(rel.parts) > max_depth or any(part.startswith(".") for part in rel.parts):
            continue
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                header = {c.strip().strip('"').lower() for c in f.readline().split(",")}
        except OSError:
            continue
        if header & set(CASE_COLUMNS):
            out.append(p)
    return out


def default_pair(labels: list[str]) -> tuple[int, int]:
    """Indices of two checkpoints to compare by default: the final weights of two different runs
    (``*/last.safetensors``, e.g. baseline vs FAM) when there are two, else the first two labels."""
    last = [i for i, lab in enumerate(labels) if lab.endswith("/last.safetensors")]
    if len(last) >= 2:
        return last[0], last[1]
    return 0, min(1, len(labels) - 1)


# --------------------------------------------------------------------------------------------
# uploads
# --------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A file's base name with anything odd replaced (a safe temporary or download file name)."""
    base = Path(str(name).replace("\\", "/")).name or "upload"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[-120:]


def read_upload(name: str, payload: bytes, *, threshold: float | None = None, max_mb: float = DEFAULT_MAX_UPLOAD_MB) -> Volume:
    """Read an uploaded ``.nii``, ``.nii.gz`` or ``.nrrd`` through :func:`skullrec.io.read_volume`.

    The bytes go to a temporary file that keeps the upload's name (read_volume picks the format
    from the suffix and names the file in its messages). Raises InputError naming the upload for a
    wrong suffix, 0 bytes, a file over ``max_mb``, corrupt gzip, 4D data or non-binary values.
    """
    safe = safe_name(name)
    if not safe.lower().endswith(UPLOAD_SUFFIXES):
        raise InputError(f"{name}: unsupported file type (upload one of {', '.join(UPLOAD_SUFFIXES)})")
    size = len(payload)
    if size == 0:
        raise InputError(f"{name}: empty file (0 bytes)")
    if size > max_mb * 1024 * 1024:
        raise InputError(f"{name}: {size / 2**20:.1f} MB is over the upload limit of {max_mb:g} MB")
    with tempfile.TemporaryDirectory(prefix="skullrec-upload-") as tmp:
        path = Path(tmp) / safe
        path.write_bytes(payload)
        try:
            # detached_data=False: a lone uploaded header has no folder of its own; a `data file:`
            # field would name a file on the server (anything from ../../etc/passwd to a FIFO).
            vol = read_volume(path, threshold=threshold, detached_data=False)
        except InputError as exc:
            # Show the user's file name, not the temporary folder; one line even if the name holds a newline.
            msg = one_line(str(exc).replace(str(path), name))
            raise InputError(msg.replace("pass --threshold T to binarise", "tick 'Binarise' and set a threshold")) from None
    vol.path = Path(name)  # later messages (e.g. an all-background upload) name the user's file, not a temporary one
    return vol


# --------------------------------------------------------------------------------------------
# 3D view
# --------------------------------------------------------------------------------------------


def read_input(path: str | Path, ct_bone_hu: float | None = None, series: tuple[str, ...] = ()) -> Volume:
    """The defective skull of ``skullrec view --in``: a mask file or DICOM series, or with ``ct_bone_hu``
    the skull mask of a CT in HU (:func:`skullrec.data.ct.read_ct_skull`), on the input's own grid."""
    if ct_bone_hu is None:
        return read_volume(path, series=series)
    from ..data.ct import read_ct_skull

    return read_ct_skull(path, ct_bone_hu, series)[0]


def downsample_for_mesh(mask: np.ndarray, affine: np.ndarray, max_edge: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a mask by block-max pooling until its longest edge is <= ``max_edge``; fix the affine.

    Block-max keeps thin bone that a plain stride would drop. The returned affine maps a block's
    index to the world position of the block's centre, so the mesh stays in place in mm.
    """
    from skimage.measure import block_reduce

    factor = max(1, math.ceil(max(mask.shape) / max_edge))
    if factor == 1:
        return mask, affine
    small = block_reduce(mask.astype(np.uint8), (factor,) * 3, np.max)
    scale = np.eye(4)
    scale[:3, :3] *= factor
    scale[:3, 3] = (factor - 1) / 2.0
    return small, affine @ scale


def mesh_from_mask(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface of a mask in world mm: (verts (V, 3), faces (F, 3)); skullrec.inference.predict's marching cubes."""
    from ..inference.mesh import mesh_from_mask as _mesh

    return _mesh(mask, affine)


def surface(mask: np.ndarray, affine: np.ndarray, max_edge: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A light surface of a mask for display: (verts (V, 3) LPS mm float32, faces (F, 3) int32).

    In LPS mm (``affine`` is the volume's voxel -> RAS one), the frame of the STL downloads and of
    3D Slicer; for skullrec's canonical voxel order it also makes the world axes run the way the
    array axes do, so the slice views' mm (:func:`slice_extent`) are the 3D view's.
    The mask is block-max pooled to at most ``max_edge`` voxels per edge first, so a 512^3 upload
    gives a mesh the browser can still turn smoothly (a 64^3 skull is meshed at full resolution).
    """
    from ..inference.mesh import lps_affine

    small, small_affine = downsample_for_mesh(np.asarray(mask), affine, max_edge)
    verts, faces = mesh_from_mask(small, lps_affine(small_affine))
    # plotly sends numpy arrays to the browser as base64 typed arrays: float32/int32 halve the payload.
    return np.asarray(verts, dtype=np.float32), np.asarray(faces, dtype=np.int32)


def mesh_trace(verts: np.ndarray, faces: np.ndarray, layer: str, opacity: float = 1.0) -> Any:
    """A plotly ``Mesh3d`` of one layer's surface (coordinates in mm), or None when it is empty."""
    import plotly.graph_objects as go

    if len(faces) == 0:
        return None
    r, g, b = COLOURS[layer]
    return go.Mesh3d(
        x=verts[:, 0], y=verts[:, 1], z=verts[:, 2], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
        color=f"rgb({r},{g},{b})", opacity=float(opacity), name=LABELS[layer], showlegend=True,
        flatshading=False, lighting={"ambient": 0.45, "diffuse": 0.8, "specular": 0.15, "roughness": 0.7},
        lightposition={"x": 100, "y": 200, "z": 150}, hoverinfo="name",
    )


# LPS axes, as the 3D view and the slices label them.
AXIS_TITLES = ("x (mm, to the left)", "y (mm, to the back)", "z (mm, up)")


def scene_ranges(vert_sets: list[np.ndarray], pad_mm: float = 5.0) -> list[tuple[float, float]] | None:
    """The (lo, hi) mm range per axis covering all vertex sets (padded), or None when all are empty."""
    sets = [np.asarray(v) for v in vert_sets if v is not None and len(v)]
    if not sets:
        return None
    pts = np.concatenate([v.reshape(-1, 3) for v in sets])
    lo, hi = pts.min(0) - pad_mm, pts.max(0) + pad_mm
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def _scene_point(p: np.ndarray, ranges: list[tuple[float, float]]) -> np.ndarray:
    """A point in mm -> plotly's scene coordinates for :func:`figure_3d`'s layout (equal mm per unit).

    plotly (gl-plot3d) centres the axis box and scales axis i by aspectratio_i / range_i; with the
    aspect ratios ``range_i / max range`` that is one factor, 1 / max range, on every axis.
    """
    lo, hi = np.array(ranges, dtype=np.float64).T
    return (np.asarray(p, dtype=np.float64) - (lo + hi) / 2) / float((hi - lo).max())


def implant_camera(implant_verts: np.ndarray, skull_verts: np.ndarray, ranges: list[tuple[float, float]],
                   distance: float = 1.6) -> dict[str, dict[str, float]] | None:
    """A plotly scene camera that looks at the implant from outside the head.

    Target: the implant's centroid; eye: ``distance`` (in units of the largest axis range) from it
    along the outward direction, centroid of the skull -> centroid of the implant. None when either
    mesh is empty or the two centroids coincide (no outward direction: the default view stays).
    """
    if implant_verts is None or skull_verts is None or not len(implant_verts) or not len(skull_verts):
        return None
    c_imp = np.asarray(implant_verts, dtype=np.float64).mean(0)
    out = c_imp - np.asarray(skull_verts, dtype=np.float64).mean(0)
    norm = float(np.linalg.norm(out))
    if norm < 1e-6:
        return None
    out /= norm
    centre = _scene_point(c_imp, ranges)
    eye = centre + distance * out
    # 'up' must not be parallel to the line of sight: for an implant on top, the front (-y in LPS) is up.
    up = (0.0, 0.0, 1.0) if abs(out[2]) < 0.9 else (0.0, -1.0, 0.0)
    xyz = ("x", "y", "z")
    return {"center": dict(zip(xyz, map(float, centre))), "eye": dict(zip(xyz, map(float, eye))), "up": dict(zip(xyz, up))}


def figure_3d(traces: list[Any], title: str = "", height: int = 520, ranges: list[tuple[float, float]] | None = None,
              camera: dict[str, dict[str, float]] | None = None) -> Any:
    """A plotly figure of Mesh3d traces in LPS mm with equal mm on every axis.

    With ``ranges`` (:func:`scene_ranges`) the axes are fixed to them with aspect ratios
    proportional to their lengths (needed for ``camera``, e.g. :func:`implant_camera`, to mean a
    place in mm); without, plotly's ``aspectmode="data"`` does the same from the data.
    """
    import plotly.graph_objects as go

    fig = go.Figure(data=[t for t in traces if t is not None])
    axes = {f"{a}axis": {"title": {"text": t}} for a, t in zip("xyz", AXIS_TITLES)}
    scene: dict[str, Any] = {"aspectmode": "data", **axes, "camera": camera or {"eye": {"x": -1.4, "y": -1.4, "z": 0.8}}}
    if ranges is not None:
        longest = max(hi - lo for lo, hi in ranges)
        scene["aspectmode"] = "manual"
        scene["aspectratio"] = {a: (hi - lo) / longest for a, (lo, hi) in zip("xyz", ranges)}
        for a, (lo, hi) in zip("xyz", ranges):
            scene[f"{a}axis"]["range"] = [lo, hi]
            scene[f"{a}axis"]["autorange"] = False
    fig.update_layout(
        title=title or None,
        height=height,
        margin={"l": 0, "r": 0, "t": 30 if title else 0, "b": 0},
        legend={"orientation": "h", "y": 1.02, "x": 0},
        scene=scene,
    )
    return fig


# --------------------------------------------------------------------------------------------
# slices
# --------------------------------------------------------------------------------------------


def slice_overlay(layers: Mapping[str, np.ndarray], axis: int, index: int, alpha: float = 0.55) -> np.ndarray:
    """An RGB uint8 image of slice ``index`` along ``axis`` with each layer blended in its colour.

    ``layers`` maps a key of :data:`COLOURS` to a mask of one common shape; later layers are drawn
    over earlier ones. On the background a layer gets its full colour; over an earlier layer the
    defective skull is opaque (it is the anatomy) and the others blend with ``alpha``, so that
    reconstruction and truth stay visible where they overlap. The image is
    indexed (row, col) = (second remaining array axis reversed, first remaining axis), i.e. the
    first remaining axis runs left to right and the second bottom to top.
    """
    shapes = {np.shape(m) for m in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"slice_overlay: layers have different shapes {sorted(shapes)}")
    shape = shapes.pop()
    if not 0 <= axis < 3 or not 0 <= index < shape[axis]:
        raise ValueError(f"slice_overlay: index {index} out of range for axis {axis} of shape {shape}")
    plane = tuple(s for a, s in enumerate(shape) if a != axis)
    img = np.zeros(plane + (3,), dtype=np.float64)
    painted = np.zeros(plane, dtype=bool)
    for key, mask in layers.items():
        sl = np.take(np.asarray(mask), index, axis=axis).astype(bool)
        colour = np.asarray(COLOURS[key], dtype=np.float64)
        # Blend only over something already drawn; on the black background a layer shows its full colour.
        over = sl & painted
        a = 1.0 if key == "defective" else alpha
        img[over] = (1 - a) * img[over] + a * colour
        img[sl & ~painted] = colour
        painted |= sl
    # (u, v) -> rows = v from top (high) to bottom (low), cols = u.
    return np.ascontiguousarray(np.flip(img.transpose(1, 0, 2), axis=0).round().astype(np.uint8))


def slice_axes(affine: np.ndarray, axis: int) -> tuple[tuple[float, float], tuple[float, float], tuple[str, str]]:
    """(pixel sizes, mm of pixel 0, axis titles) of the slices along ``axis`` of a volume on ``affine`` (voxel -> RAS).

    The in-plane array axes in LPS mm, the 3D view's frame (:func:`surface`): for skullrec's canonical
    voxel order (axis 0 left, 1 posterior, 2 superior) array axis a runs along LPS axis a, so a
    pixel's mm here is the 3D view's coordinate (exactly for an axis-aligned grid, along the voxel
    axes for a tilted one).
    """
    from ..inference.mesh import lps_affine

    lps = lps_affine(affine)
    rest = [a for a in range(3) if a != axis]
    spacing = tuple(float(np.linalg.norm(lps[:3, a])) for a in rest)
    origin = tuple(float(lps[a, 3]) for a in rest)
    return spacing, origin, tuple(AXIS_TITLES[a] for a in rest)


def slice_figure(image: np.ndarray, spacing: tuple[float, float], title: str = "", height: int = 420,
                 origin: tuple[float, float] = (0.0, 0.0), axis_titles: tuple[str, str] = ("mm", "mm")) -> Any:
    """A plotly figure showing an overlay image with pixel sizes in mm (equal aspect); pixel 0 at ``origin`` mm."""
    import plotly.graph_objects as go

    du, dv = (float(s) for s in spacing)
    u0, v0 = (float(o) for o in origin)
    rows = image.shape[0]
    # Rows were flipped so that v grows upwards; y0 puts row 0 at the top edge in mm.
    fig = go.Figure(go.Image(z=image, x0=u0, dx=du, y0=v0 + (rows - 1) * dv, dy=-dv, hoverinfo="x+y"))
    fig.update_layout(
        title=title or None, height=height, margin={"l": 0, "r": 0, "t": 30 if title else 0, "b": 0},
        xaxis={"title": {"text": axis_titles[0]}},
        yaxis={"title": {"text": axis_titles[1]}, "scaleanchor": "x", "autorange": True},
    )
    return fig


# --------------------------------------------------------------------------------------------
# metrics and downloads
# --------------------------------------------------------------------------------------------

METRIC_UNITS = {
    "dsc": ("DSC", ""),
    "bdsc": ("bDSC", ""),
    "hd_mm": ("HD", "mm"),
    "hd95_mm": ("HD95", "mm"),
    "hd_vox": ("HD", "voxels"),
    "hd95_vox": ("HD95", "voxels"),
}


# What a metric without a value shows (not computed, or undefined: a distance to an empty mask).
NO_VALUE = "—"


def case_metric_rows(pred: Volume, truth: Volume, defective: Volume | None, target: str) -> list[dict[str, Any]]:
    """Metrics of one prediction against its truth as display rows: target, metric, value, unit.

    For a failed case (an empty prediction or truth) the distances are undefined: their value is
    None (shown as :data:`NO_VALUE`), not the worst-case stand-in ``skullrec evaluate`` averages.
    """
    from ..evaluation.metrics import case_metrics

    m = case_metrics(pred.data, truth.data, truth.spacing, defective=None if defective is None else defective.data, target=target)
    rows = []
    for key, (label, unit) in METRIC_UNITS.items():
        if key in m and m[key] is not None:
            undefined = m.get("failed") and key.startswith("hd")
            value = None if undefined or not math.isfinite(float(m[key])) else round(float(m[key]), 4)
            rows.append({"target": target, "metric": label, "value": value, "unit": unit})
    if m.get("failed"):
        rows.append({"target": target, "metric": "failed", "value": 1.0, "unit": m.get("failure") or "empty prediction"})
    return rows


def metric_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`case_metric_rows` for a table: values as text (4 significant digits), :data:`NO_VALUE` where undefined."""
    return [{**r, "value": metric_text(r["value"], "", ".4g")} for r in rows]


def metric_text(value: float | None, unit: str = "", fmt: str = ".3f") -> str:
    """A metric for display: the number and unit, or :data:`NO_VALUE` when missing or not finite."""
    if value is None or not math.isfinite(float(value)):
        return NO_VALUE
    return f"{float(value):{fmt}} {unit}".strip()


def nifti_bytes(volume: Volume) -> bytes:
    """A volume as gzipped NIfTI bytes (uint8, its own affine and header) for a download button."""
    from ..io import write_volume

    with tempfile.TemporaryDirectory(prefix="skullrec-dl-") as tmp:
        path = write_volume(Path(tmp) / "volume.nii.gz", volume)
        return path.read_bytes()


def stl_bytes(mask: np.ndarray, affine: np.ndarray, name: str = "skullrec") -> bytes:
    """A binary STL (LPS mm) of a mask's surface on its full grid, as ``skullrec predict --stl`` writes it
    (``affine``: the volume's voxel -> RAS one)."""
    from ..inference.mesh import lps_affine, printable_mesh
    from ..inference.mesh import stl_bytes as _stl

    verts, faces = printable_mesh(mask, lps_affine(affine))
    return _stl(verts, faces, name)


# --------------------------------------------------------------------------------------------
# results browser
# --------------------------------------------------------------------------------------------

CASE_COLUMNS = ("case", "case_id", "id", "cid")
# Columns that say which run / checkpoint / defect set a row belongs to: filters, not metrics.
BOOKKEEPING_COLUMNS = ("method", "run", "seed", "epoch", "set", "split", "target", "lam", "lambda")


def load_results(source: Any, name: str = "results CSV") -> Any:
    """Read a results CSV (path or file-like) into a pandas DataFrame with a ``case`` column.

    Case ids are read as text so that "003" keeps its zeros. Raises InputError naming the file for
    unreadable CSVs and for CSVs without a case-id column or without any numeric metric.
    """
    import pandas as pd

    label = str(source) if isinstance(source, (str, Path)) else name
    try:
        df = pd.read_csv(source, dtype={c: str for c in CASE_COLUMNS})
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{label}: not a readable CSV ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    # skullrec's CSV writers escape text that a spreadsheet would run as a formula ("=..." -> "'=..."):
    # undo it, so case ids match their file names again.
    from ..evaluation.evaluate import unescape_csv_cell

    df.columns = [unescape_csv_cell(c) if isinstance(c, str) else c for c in df.columns]
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = df[c].map(lambda v: unescape_csv_cell(v) if isinstance(v, str) else v)
    cols = {c.lower(): c for c in df.columns}
    key = next((cols[c] for c in CASE_COLUMNS if c in cols), None)
    if key is None:
        raise InputError(f"{label}: no case-id column (expected one of {', '.join(CASE_COLUMNS)})")
    df = df.rename(columns={key: "case"})
    if not metric_columns(df):
        raise InputError(f"{label}: no numeric metric columns")
    return df


def metric_columns(df: Any) -> list[str]:
    """Numeric metric columns of a results table (known metrics first); not bookkeeping or empty ones."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    numeric = [
        c for c in df.columns
        if c != "case" and c.lower() not in BOOKKEEPING_COLUMNS
        and is_numeric_dtype(df[c]) and not is_bool_dtype(df[c]) and df[c].notna().any()
    ]
    preferred = [c for c in METRIC_UNITS if c in numeric]
    return preferred + [c for c in numeric if c not in preferred]


def sort_results(df: Any, metric: str, ascending: bool) -> Any:
    """Rows sorted by ``metric`` (NaN last, ties broken by case id so the order is stable)."""
    if metric not in df.columns:
        raise InputError(f"results: no column '{metric}'")
    return df.sort_values([metric, "case"], ascending=[ascending, True], na_position="last", kind="mergesort").reset_index(drop=True)


__all__ = [
    "AXES",
    "COLOURS",
    "LABELS",
    "CaseVolumes",
    "case_metric_rows",
    "discover_cases",
    "discover_checkpoints",
    "default_pair",
    "default_split",
    "discover_results",
    "downsample_for_mesh",
    "figure_3d",
    "find_case",
    "implant_camera",
    "metric_table",
    "metric_text",
    "scene_ranges",
    "slice_axes",
    "load_case",
    "load_results",
    "mesh_from_mask",
    "mesh_trace",
    "metric_columns",
    "nifti_bytes",
    "read_upload",
    "safe_name",
    "slice_figure",
    "slice_overlay",
    "sort_results",
    "surface",
    "stl_bytes",
]
