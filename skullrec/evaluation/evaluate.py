"""Folder-vs-folder scoring (``skullrec evaluate``) and the in-memory helpers the experiment reuses.

``skullrec evaluate --pred DIR --truth DIR [--defective DIR] [--target skull|implant] --out results.csv``
pairs volumes by case id (``012.nii.gz`` and ``012.nrrd`` are the same case), checks that each pair
lies on the same grid, scores it with :func:`skullrec.evaluation.metrics.case_metrics` and writes

* ``results.csv``: one row per case (columns :data:`CSV_COLUMNS`);
* ``results.summary.json``: per metric mean, std, median, quartiles, IQR, min, max over *all* cases
  (failed ones included with their worst values), the number and ids of failed and skipped cases,
  the target and the HD95 definition.

The two are replaced as a set (both new or both old, :func:`write_results`), and never where an
input lies (:func:`check_outputs`). No model is needed. Python users call :func:`evaluate_folders` (files) or :func:`evaluate_arrays`
(stacked arrays, e.g. reconstructions in memory) and :func:`summarise`.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, check_choice
from ..guards import check_outside_inputs
from ..io import Volume, atomic_write_files, list_volumes, read_volume
from ..utils import ordered_process_map
from .metrics import DEFAULT_HD95, HD95_DEFINITIONS, METRIC_KEYS, TARGETS, batch_metrics, case_metrics

CSV_COLUMNS: tuple[str, ...] = ("case", "target", *METRIC_KEYS)
SUMMARY_METRICS: tuple[str, ...] = ("dsc", "bdsc", "hd_mm", "hd95_mm", "hd_vox", "hd95_vox")
# Two grids are "the same" when their affines agree to float noise: NIfTI stores the affine in
# float32 (about 1e-5 mm at 100 mm from the origin) and NRRD's LPS->RAS conversion adds rounding.
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-5
MISSING_SHOWN = 5  # case ids listed in a missing-partner message


def summary_path(out: str | Path) -> Path:
    """Where the summary JSON of a results CSV goes: ``results.csv`` -> ``results.summary.json``."""
    out = Path(out)
    stem = out.name[: -len(".csv")] if out.name.lower().endswith(".csv") else out.name
    return out.with_name(stem + ".summary.json")


def _read_case(path: Path, cid: str, threshold: float | None) -> Volume:
    try:
        return read_volume(path, threshold=threshold)
    except InputError as exc:
        raise InputError(f"case {cid}: {exc}") from None


def _check_same_grid(cid: str, ref: Volume, other: Volume, what: str) -> None:
    if other.shape != ref.shape:
        raise InputError(f"case {cid}: {what} has shape {other.shape} but truth has {ref.shape} ({other.path})")
    if not np.allclose(other.affine, ref.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        diff = float(np.abs(other.affine - ref.affine).max())
        raise InputError(
            f"case {cid}: {what} affine differs from truth's by up to {diff:.4g} (tolerance {AFFINE_ATOL_MM:g} mm) ({other.path})"
        )


def pair_cases(
    pred: str | Path, truth: str | Path, defective: str | Path | None = None, skip_missing: bool = False
) -> tuple[dict[str, tuple[Path, Path, Path | None]], list[str]]:
    """Pair files by case id: ``{case: (pred, truth, defective|None)}`` and the sorted skipped ids.

    A case missing from any folder is an InputError naming it, unless ``skip_missing`` (then it is
    skipped and returned in the second list). No common case at all is always an error.
    """
    folders = {"pred": list_volumes(pred), "truth": list_volumes(truth)}
    if defective is not None:
        folders["defective"] = list_volumes(defective)
    all_ids = sorted(set().union(*folders.values()))
    common = [c for c in all_ids if all(c in f for f in folders.values())]
    missing = [c for c in all_ids if c not in common]
    if missing and not skip_missing:
        cid = missing[0]
        lacking = [name for name, f in folders.items() if cid not in f]
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:MISSING_SHOWN])}{', ...' if len(missing) > MISSING_SHOWN else ''})" if len(missing) > 1 else ""
        raise InputError(f"case {cid}: no partner in the {' and '.join(lacking)} folder{more}; pass --skip-missing to skip such cases")
    if not common:
        raise InputError(f"{pred} and {truth}: no case id in common")
    pairs = {c: (folders["pred"][c], folders["truth"][c], folders["defective"][c] if defective is not None else None) for c in common}
    return pairs, missing


def _score_case(job: tuple[str, Path, Path, Path | None, float | None, str, str]) -> dict[str, Any]:
    """Read, check and score one case (a worker's job in :func:`evaluate_folders`)."""
    cid, p_path, t_path, d_path, threshold, hd95, target = job
    t = _read_case(t_path, cid, threshold)
    p = _read_case(p_path, cid, threshold)
    _check_same_grid(cid, t, p, "prediction")
    d = None
    if d_path is not None:
        d = _read_case(d_path, cid, threshold)
        _check_same_grid(cid, t, d, "defective skull")
    m = case_metrics(p.data, t.data, t.spacing, defective=None if d is None else d.data, hd95=hd95, target=target)
    return {"case": cid, "target": target, **m}


def evaluate_folders(
    pred: str | Path,
    truth: str | Path,
    defective: str | Path | None = None,
    target: str = "skull",
    hd95: str = DEFAULT_HD95,
    skip_missing: bool = False,
    threshold: float | None = None,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every case of ``pred`` against ``truth`` (files); returns (rows, summary).

    ``workers`` (at most 4) processes score cases in parallel (at 512^2 x Z reading the three
    volumes is most of a case's time); rows and values do not depend on it.

    Each case is read, checked (same shape and affine as its truth, binary) and scored one at a
    time, so folders of full-size 512^3 skulls never sit in memory together.
    Raises InputError naming the case for missing partners (unless ``skip_missing``), shape or
    affine mismatches and non-binary volumes (pass ``threshold`` to binarise).
    """
    check_choice("--target", target, TARGETS)
    check_choice("--hd95", hd95, HD95_DEFINITIONS)
    pairs, skipped = pair_cases(pred, truth, defective, skip_missing)
    rows: list[dict[str, Any]] = []
    jobs = [(cid, p_path, t_path, d_path, threshold, hd95, target) for cid, (p_path, t_path, d_path) in pairs.items()]
    for row in ordered_process_map(_score_case, jobs, workers):
        rows.append(row)
        if progress is not None:
            progress(row["case"])
    summary = summarise(rows, target=target, hd95=hd95, skipped=skipped)
    summary["pred"], summary["truth"] = str(pred), str(truth)
    summary["defective"] = None if defective is None else str(defective)
    return rows, summary


def evaluate_arrays(
    pred: np.ndarray,
    truth: np.ndarray,
    spacings: Sequence[Sequence[float]] | np.ndarray,
    defective: np.ndarray | None = None,
    hd95: str = DEFAULT_HD95,
    target: str | None = None,
    ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Metric rows for N in-memory cases stacked as (N, X, Y, Z) with N spacings (mm).

    Rows hold :data:`skullrec.evaluation.metrics.METRIC_KEYS`, plus ``case`` when ``ids`` are given and
    ``target`` when ``target`` is given, so callers can merge their own keys into them. Without a
    target, bDSC compares ``pred AND NOT defective`` with ``truth AND NOT defective``, which is the
    same number for skulls and for implants that do not overlap the defective skull.
    """
    rows = batch_metrics(pred, truth, spacings, defective=defective, hd95=hd95, target=target or "skull")
    if ids is not None and len(ids) != len(rows):
        raise ValueError(f"{len(ids)} ids for {len(rows)} cases")
    out = []
    for i, r in enumerate(rows):
        head: dict[str, Any] = {}
        if ids is not None:
            head["case"] = str(ids[i])
        if target is not None:
            head["target"] = target
        out.append({**head, **r})
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "q1": None, "q3": None, "iqr": None, "min": None, "max": None}
    q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        # Sample standard deviation (ddof=1), the usual "mean ± std" of a results table.
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "median": med, "q1": q1, "q3": q3, "iqr": q3 - q1,
        "min": float(a.min()), "max": float(a.max()),
    }


def summarise(
    rows: Sequence[dict[str, Any]],
    target: str | None = None,
    hd95: str | None = None,
    skipped: Sequence[str] = (),
) -> dict[str, Any]:
    """Summary of per-case rows: per metric n, mean, std, median, q1, q3, iqr, min, max, plus counts.

    Failed cases are *included* with their worst values (DSC 0, HD = volume diagonal), so a method
    that fails is never flattered by dropping cases; ``n_failed`` and ``failed_cases`` say how many
    and which. ``bdsc`` has n = 0 when no defective skulls were given. ``target`` and ``hd95``
    default to the rows' own fields.
    """
    defs = sorted({r.get("hd95_definition") for r in rows if r.get("hd95_definition")})
    if hd95 is None:
        hd95 = defs[0] if len(defs) == 1 else ("mixed" if defs else None)
    elif defs and defs != [hd95]:
        raise ValueError(f"rows were scored with HD95 definition(s) {defs}, not {hd95!r}")
    if target is None:
        targets = sorted({r.get("target") for r in rows if r.get("target")})
        target = targets[0] if len(targets) == 1 else ("mixed" if targets else None)
    failed = [str(r.get("case", i)) for i, r in enumerate(rows) if r.get("failed")]
    metrics = {}
    for key in SUMMARY_METRICS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            raise ValueError(f"NaN in '{key}': rows must come from skullrec.evaluation.metrics (which never returns NaN)")
        metrics[key] = _stats(values)
    return {
        "target": target,
        "hd95_definition": hd95,
        "n_cases": len(rows),
        "n_failed": len(failed),
        "failed_cases": failed,
        "n_skipped": len(skipped),
        "skipped_cases": list(skipped),
        "failed_values": "failed cases (empty prediction or truth) count as DSC = bDSC = 0 and HD = HD95 = volume diagonal",
        "metrics": metrics,
    }


# A spreadsheet reads a cell starting with one of these as a formula (OWASP, "CSV Injection"): a case named
# "=HYPERLINK(...)" or "@SUM(...)" would run when results.csv is opened. Such text cells get a leading single
# quote, which spreadsheets take as "text" and do not show; a cell that starts with a quote gets one more, so
# unescape_csv_cell undoes escape_csv_cell exactly. Numbers are written as numbers (a negative DSC difference
# starts with "-" and must stay a number), and so is text that is a plain decimal number.
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def escape_csv_cell(text: str) -> str:
    """``text`` safe as a spreadsheet cell: a leading single quote where it would start a formula; see :data:`CSV_FORMULA_START`."""
    if text.startswith(CSV_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def unescape_csv_cell(text: str) -> str:
    """The text :func:`escape_csv_cell` was given (what a reader of skullrec's CSVs, e.g. the viewer, matches file names with)."""
    if text.startswith("'") and text[1:].startswith(CSV_FORMULA_START):
        return text[1:]
    return text


def _csv_cell(value: Any) -> str:
    """One CSV cell: None empty, booleans true/false, numbers as numbers, any text escaped (:func:`escape_csv_cell`)."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return escape_csv_cell(str(value))


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    """Per-case rows as CSV text (extra keys are appended as columns, None as an empty cell)."""
    extra = [k for r in rows for k in r if k not in columns]
    cols = list(columns) + list(dict.fromkeys(extra))
    lines = [_csv_line([escape_csv_cell(str(c)) for c in cols])]
    lines += [_csv_line([_csv_cell(r.get(c)) for c in cols]) for r in rows]
    return "".join(lines)


def _csv_line(cells: list[str]) -> str:
    """One CSV row ending in ``\n``, every cell holding a CR or LF quoted.

    The csv module quotes only cells holding a character of its line terminator, so with ``\n`` alone a
    CR inside a case name went out bare: a spreadsheet starts a new row there, whose first cell
    (``"x\r=cmd"``) escapes :func:`escape_csv_cell`. Written with ``\r\n``, each row quotes both; its
    terminator (the last two characters, outside any cell) becomes ``\n`` again.
    """
    buf = _stdio.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue()[:-2] + "\n"


def write_results(
    out: str | Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any], overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
) -> tuple[Path, Path]:
    """Write the CSV and its summary JSON as one set; refuses existing files unless ``overwrite``.

    Either both new files are in place or (a full disk, ``ulimit -f``) both old ones remain
    (:func:`skullrec.io.atomic_write_files`). ``inputs`` (the scored folders) are never written
    (:func:`check_outputs`). A symlinked ``out`` keeps its link: its target gets the new results.
    """
    out = Path(out)
    js = summary_path(out)
    check_outputs(out, overwrite, inputs)
    atomic_write_files({_real_file(out): rows_to_csv(rows).encode("utf-8"),
                        _real_file(js): (json.dumps(summary, indent=1) + "\n").encode("utf-8")})
    return out, js


def _real_file(path: Path) -> Path:
    """Where a write to ``path`` goes: the target of a symlink (replacing the link would leave the target stale)."""
    return path.resolve() if path.is_symlink() else path


def check_outputs(out: Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> None:
    """InputError when ``out`` or its summary JSON touches an input, is a folder, or exists and ``overwrite`` is not set.

    The rule of :func:`skullrec.guards.check_outside_inputs`: neither file may be an input file or
    lie inside an input folder (``--out TRUTH/001.nii.gz`` would replace a ground truth), whatever ``overwrite``.
    """
    for p in (out, summary_path(out)):
        check_outside_inputs(p, inputs, folder=False)
    for p in (out, summary_path(out)):
        if p.exists() and p.is_dir():
            raise InputError(f"{p}: is a folder; --out must be a CSV file path")
        if p.exists() and not overwrite:
            raise InputError(f"{p}: already exists; pass --overwrite to replace it")


__all__ = [
    "CSV_COLUMNS",
    "evaluate_arrays",
    "evaluate_folders",
    "pair_cases",
    "check_outputs",
    "rows_to_csv",
    "escape_csv_cell",
    "unescape_csv_cell",
    "summarise",
    "summary_path",
    "write_results",
]
