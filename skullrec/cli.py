"""The ``skullrec`` command line: the one layer that parses options, checks flags and prints.

Each command is one ``*_command`` function: its signature declares the options (typer reads the
``Annotated`` metadata; a Python caller just passes values), its body checks the flags once, calls the
domain function that does the work and prints the outcome. Called from Python it raises InputError;
as a command, :func:`user_errors` turns that into one line. Domain functions return values and report
progress through callbacks, so nothing below this module imports typer or rich. Heavy modules are imported inside the commands to keep
``skullrec --help`` fast. A user mistake (:class:`skullrec.errors.InputError`) is printed as one line
``error: ...`` on stderr with exit code 2, never as a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import InputError, check_choice, describe_os_error, one_line

app = typer.Typer(
    name="skullrec",
    help="3D skull shape reconstruction: data, training with relative flatness (FAM), prediction, evaluation, viewer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options several commands share.
OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace an output folder that already holds results.")]
SEED = Annotated[int, typer.Option(help="Seed for everything random (same seed, same bytes).")]
DEVICE = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
THRESHOLD = Annotated[Optional[float], typer.Option(help="Binarise non-binary inputs as value > T.")]
CT = Annotated[bool, typer.Option("--ct", help="Inputs are CT scans in HU (DICOM series, NIfTI or NRRD): the skull mask is bone >= --bone-hu, "
                                  "largest connected piece, the defect left open.")]
BONE_HU = Annotated[Optional[float], typer.Option("--bone-hu", help="With --ct: bone threshold in HU (default 300).")]
SERIES = Annotated[Optional[list[str]], typer.Option("--series", help="DICOM: the series instance UID to read from a folder holding several "
                                                     "(repeatable: one per such folder).")]
# The names of skullrec.data.stage2.ALL_KINDS, written out so `--help` imports no numpy (a test keeps them equal).
KIND_NAMES = "skullfix, set1, set2, vault-round, vault-irregular, midline, lateral, fronto-orbital, small, bilateral"
HELD_OUT = "fronto-orbital"  # skullrec.data.defect_kinds.HELD_OUT_KIND


def user_errors(fn):
    """Turn InputError, OSError and MemoryError into a one-line message and exit code 2, KeyboardInterrupt into exit 130.

    The one line is guaranteed here (:func:`skullrec.errors.one_line`): a newline or other control character in
    a file name or value is printed escaped, so it can neither split the message nor act on the terminal.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            typer.echo(f"error: {one_line(str(exc))}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # permission denied, read-only file system, disk full, ...
            typer.echo(f"error: {one_line(describe_os_error(exc))}", err=True)
            raise typer.Exit(2) from None
        except MemoryError:
            typer.echo("error: out of memory (the volumes are too large for this machine; try fewer or smaller inputs)", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            if exc.args:  # e.g. the trainer's "state saved ...; continue with ..." line
                typer.echo(one_line(str(exc.args[0])), err=True)
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# shared pieces: flag checks, consoles, progress bars


def _at_least(flag: str, value: float | None, low: float) -> None:
    """InputError ``FLAG: must be >= LOW, got VALUE`` (None passes: the flag was not given)."""
    if value is not None and value < low:
        raise InputError(f"{flag}: must be >= {low}, got {value}")


def _ct_options(ct: bool, bone_hu: float | None, threshold: float | None) -> float:
    """Check --ct / --bone-hu / --threshold together; returns the bone threshold in HU to use."""
    from .data.ct import DEFAULT_BONE_HU

    if bone_hu is not None and not ct:
        raise InputError("--bone-hu: only with --ct (a CT in HU)")
    if ct and threshold is not None:
        raise InputError("--threshold: binarises masks; with --ct the bone threshold is --bone-hu (in HU)")
    if bone_hu is not None and not -1024.0 <= bone_hu <= 3071.0:  # the range of a 12-bit CT in HU
        raise InputError(f"--bone-hu: must be between -1024 and 3071 HU, got {bone_hu:g}")
    return DEFAULT_BONE_HU if bone_hu is None else float(bone_hu)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


@contextlib.contextmanager
def _bar(label: str, console: Any) -> Iterator[Callable[[int, int | None], None]]:
    """A transient progress bar on ``console``; yields the ``progress(done, total)`` callback for domain code.

    The bar starts at the first call, so the checks a domain function makes before its slow part
    fail without one. Transient and on stderr: an error leaves just its one line, stdout stays clean.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Off when stderr is not a terminal (a log file, a pipe): rich would leave a blank line there.
    bar = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    task = None

    def update(done: int, total: int | None = None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def _fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# the commands (also the Python API of the command line)


def synth_command(
    out: Annotated[Path, typer.Option("--out", help="Output data-set folder (layout: see skullrec.data.layout).")] = Path("data/synthetic"),
    n_train: Annotated[int, typer.Option(help="Number of training skulls.")] = 100,
    n_eval: Annotated[int, typer.Option(help="Number of evaluation skulls (each gets a set-1 and a set-2 defect).")] = 20,
    size: Annotated[int, typer.Option(help="Edge length of the cubic volumes.")] = 64,
    seed: SEED = 0,
    overwrite: OVERWRITE = False,
) -> Path:
    """Generate the procedural skull data set (the embedded default) with set-1 and set-2 defects."""
    import numpy as np

    from .data.synth import write_synthetic

    _at_least("--n-train", n_train, 0)
    _at_least("--n-eval", n_eval, 0)
    if n_train + n_eval < 1:
        raise InputError("--n-train/--n-eval: at least one skull is needed")
    _at_least("--size", size, 8)
    _at_least("--seed", seed, 0)
    result = write_synthetic(out=out, n_train=n_train, n_eval=n_eval, size=size, seed=seed, overwrite=overwrite)
    console = _console()
    console.print(f"wrote {result.out}")
    by_split: dict[str, list[dict[str, Any]]] = {}
    for r in result.records:
        by_split.setdefault(r["split"], []).append(r)
    for split, rs in by_split.items():
        bone = np.mean([r["bone_fraction"] for r in rs])
        removed = np.mean([r["defect"]["removed_fraction"] for r in rs])
        implant = np.mean([r["implant_fraction"] for r in rs])
        console.print(f"  {split:9s} {len(rs):4d} cases  bone {bone:.3f}  removed {removed:.3f}  implant {implant:.3f}")
    console.print("  bone = bone/size^3, removed = defect/bone (source), implant = implant/complete")
    console.print("  seconds: generate {generate:.1f}, defects {defects:.1f}, prepare {prepare:.1f}, write {write:.1f}".format(**result.timing))
    console.print(f"  total {result.wall_s:.1f} s wall, {result.cpu_s:.1f} s CPU")
    return result.out


def prepare_command(
    complete: Annotated[Path, typer.Option("--in", help="Folder of complete skulls (any size and spacing).")],
    out: Annotated[Path, typer.Option("--out", help="Output data-set folder.")],
    defective: Annotated[Optional[Path], typer.Option("--defective", help="Folder of the matching defective skulls (same case ids).")] = None,
    size: Annotated[int, typer.Option(help="Edge length of the prepared cubic volumes.")] = 64,
    margin_mm: Annotated[float, typer.Option(help="Margin around the bone's bounding box, in mm.")] = 4.0,
    eval_fraction: Annotated[float, typer.Option(help="Fraction of cases held out for evaluation (set 1 and set 2 defects).")] = 0.2,
    seed: SEED = 0,
    threshold: THRESHOLD = None,
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N cases.")] = None,
    overwrite: OVERWRITE = False,
    workers: Annotated[int, typer.Option(hidden=True, help="Worker processes (at most 2).")] = 2,
) -> Path:
    """Turn real skulls (e.g. SkullFix NRRD) into a 64^3 data set in the project's layout."""
    from .data.build import SPLIT_ORDER, build_dataset

    _at_least("--size", size, 8)
    _at_least("--margin-mm", margin_mm, 0)
    _at_least("--max-cases", max_cases, 1)
    console = _console(stderr=True)
    t0 = time.perf_counter()
    with _bar("prepare", console) as progress:
        built = build_dataset(
            complete=complete, out=out, defective=defective, size=size, margin_mm=margin_mm, eval_fraction=eval_fraction,
            seed=seed, threshold=threshold, max_cases=max_cases, overwrite=overwrite, workers=workers, progress=progress,
            warn=lambda msg: console.print(msg, style="yellow", markup=False, highlight=False, soft_wrap=True),
        )
    counts = Counter(r["split"] for r in built.records)
    console.print(f"prepared {len(built.ids)} skulls in {time.perf_counter() - t0:.0f} s -> {built.out} ("
                  + ", ".join(f"{k} {counts[k]}" for k in SPLIT_ORDER if counts[k]) + ")")
    return built.out


def defects_command(
    complete: Annotated[Path, typer.Option("--in", help="Folder of complete skulls (.nii, .nii.gz, .nrrd).")],
    out: Annotated[Path, typer.Option("--out", help="Output data-set folder.")],
    seed: SEED = 0,
    eval_fraction: Annotated[float, typer.Option(help="Fraction of cases that go to the evaluation sets.")] = 0.2,
    threshold: THRESHOLD = None,
    overwrite: OVERWRITE = False,
    size: Annotated[int, typer.Option(hidden=True, help="Edge length of the prepared volumes.")] = 64,
) -> Path:
    """Cut set-1 (training-like) and set-2 (different) defects into any folder of complete skulls."""
    from .data.resample import DEFAULT_MARGIN_MM

    # No orientation warning: read_volume brings every file to the canonical L, P, S order, so the
    # defects land at the same anatomical place whatever voxel order a file uses.
    console = _console(stderr=True)
    t0 = time.perf_counter()
    result = prepare_command(
        complete=Path(complete), out=Path(out), defective=None, size=size, margin_mm=DEFAULT_MARGIN_MM,
        eval_fraction=eval_fraction, seed=seed, threshold=threshold, overwrite=overwrite,
    )
    n_skulls = len(json.loads((Path(result) / "manifest.json").read_text())["cases"])  # what was written, not re-listed
    console.print(f"defects: {n_skulls} skulls in {time.perf_counter() - t0:.1f} s -> {result}")
    return result


def train_command(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML config (see configs/); with --resume, defaults to the run's own.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set fam.lam=0.02 (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder (default runs/NAME).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the config differs from the run's.")] = False,
    device: DEVICE = "auto",
    overwrite: OVERWRITE = False,
) -> None:
    """Train the autoencoder (baseline, fam, fam_authors, sam, asam or lookbehind)."""
    from .training.run_dir import CONFIG_FILE
    from .training.trainer import run_training

    if config is None and resume is None:
        raise InputError("--config: required (or --resume RUN_DIR to continue a run with its own config)")
    if resume is not None and run_dir is not None and Path(run_dir) != Path(resume):
        raise InputError(f"--run-dir {run_dir}: give either --run-dir or --resume, not two different folders")
    if resume is not None and not (Path(resume) / CONFIG_FILE).is_file():
        raise InputError(f"{resume}: not a run folder (no {CONFIG_FILE}); nothing to resume")
    run_training(
        config if config is not None else Path(resume) / CONFIG_FILE, overrides or [], run_dir=run_dir, resume=resume,
        force=force, device=device, overwrite=overwrite, log=lambda s: print(s, flush=True),
    )


def flatness_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file written by 'skullrec train'.")],
    data: Annotated[Path, typer.Option("--data", help="Data-set folder.")],
    split: Annotated[str, typer.Option(help="Split to measure on.")] = "train",
    samples: Annotated[int, typer.Option(help="Hutchinson probes.")] = 64,
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N cases.")] = None,
    device: DEVICE = "auto",
    seed: Annotated[int, typer.Option(hidden=True, help="Seed of the Rademacher probes.")] = 0,
    ratio: Annotated[Optional[list[float]], typer.Option("--ratio", help="Report the lambda giving this ||grad FAM|| / ||grad Dice|| (repeatable; default 0.01 and 0.1).")] = None,
    paper_lam: Annotated[Optional[list[float]], typer.Option("--paper-lam", help="Report the lambda equivalent to this lambda of the authors' objective (repeatable; default 0.0006, 0.002, 0.02).")] = None,
) -> list[Any]:
    """Print Tr(H), ||w||^2, kappa-hat and neuron-wise kappa of the configured layer on a data set, and what lambda means there."""
    ratios = tuple(ratio) if ratio else (0.01, 0.1)
    paper_lams = tuple(paper_lam) if paper_lam else (0.0006, 0.002, 0.02)
    import math

    from .flatness.measure import measure_checkpoint

    if samples < 2:
        raise InputError(f"--samples: need at least 2 probes for a standard error, got {samples}")
    report = measure_checkpoint(checkpoint, data, split=split, samples=samples, max_cases=max_cases, device=device, seed=seed,
                                ratios=ratios, paper_lams=paper_lams)
    print(f"checkpoint {checkpoint}  data {data}/{split}: {report.cases} cases, Dice loss (first <=8) {report.loss:.4f}")
    for r in report.layers:
        n = math.prod(r.shape)
        print(f"layer {r.name} ({'x'.join(map(str, r.shape))}, {n} weights), {samples} Rademacher probes, {r.seconds_per_probe:.2f} s/probe")
        exact = (
            f"   exact {r.trace_exact:.6g}" if r.trace_exact is not None
            else f"   exact: skipped ({n} products, ~{r.exact_estimate_s:.0f} s > 60 s budget; use fewer --max-cases)"
        )
        print(f"  Tr(H)          {r.trace_mean:.6g} +- {r.trace_se:.2g} (SE){exact}")
        print(f"  ||w||^2        {r.norm_sq:.6g}")
        exact_k = f"   exact {r.norm_sq * r.trace_exact:.6g}" if r.trace_exact is not None else ""
        print(f"  kappa_hat      {r.kappa_hat:.6g} +- {r.kappa_hat_se:.2g} (SE){exact_k}")
        exact_nw = f"   exact {r.kappa_nw_exact:.6g}" if r.kappa_nw_exact is not None else ""
        print(f"  kappa (neuron) {r.kappa_nw_mean:.6g} +- {r.kappa_nw_se:.2g} (SE){exact_nw}")
    ls = report.lambdas
    if ls is not None:
        f = ls.fam
        print(f"lambda scale (first {ls.cases} cases; method fam: norm {f.norm}, gradient {f.gradient}, trace {f.trace}, estimator {f.estimator})")
        print("  ratio ||grad FAM|| / ||grad Dice|| per unit lambda: "
              + ", ".join(f"{k} {v:.4g}" for k, v in ls.ratio_per_lam.items())
              + "; authors' objective: " + ", ".join(f"{k} {v:.4g}" for k, v in ls.authors_ratio_per_lam.items()))
        for r_, lam in ls.lam_for_ratio.items():
            print(f"  lambda for ratio {r_:g}: {lam:.4g}")
        for lp in ls.lam_equivalent:
            print(f"  paper lambda {lp:g} (authors' objective) = lambda {ls.lam_equivalent[lp]:.4g} here by gradient ratio, "
                  f"{ls.lam_penalty_match[lp]:.4g} by penalty value")
    return report.layers


def predict_command(
    inp: Annotated[Path, typer.Option("--in", help="A defective skull (.nii, .nii.gz, .nrrd; any size) or a folder of them; or one DICOM series "
                                      "folder (one case), or a folder of DICOM series folders (one case each, named after the folder).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: complete/ and implant/ in each input's format (NRRD stays NRRD; DICOM gives NIfTI), and stl/.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="A checkpoint file written by 'skullrec train' (default: the shipped skullrec/weights/, stage 1 + stage 2).")] = None,
    stl: Annotated[bool, typer.Option("--stl", help="Also write the implant as a printable STL mesh (LPS mm, as 3D Slicer reads STL).")] = False,
    batch_size: Annotated[int, typer.Option(help="Volumes per forward pass.")] = 8,
    threshold: THRESHOLD = None,
    device: DEVICE = "auto",
    overwrite: OVERWRITE = False,
    stage2: Annotated[Optional[Path], typer.Option("--stage2", help="A stage-2 checkpoint from 'skullrec train-implant': the implant is designed in a box around the defect.")] = None,
    keep_stage1: Annotated[bool, typer.Option("--keep-stage1", help="With stage 2: also write stage 1's own implant to OUT/stage1_implant/.")] = False,
    mirror: Annotated[bool, typer.Option("--mirror", help="With stage 2: also run it on the left-right mirror image of the box and average (test-time augmentation, twice stage 2's network time).")] = False,
    ct: CT = False,
    bone_hu: BONE_HU = None,
    series: SERIES = None,
    stl_skull: Annotated[bool, typer.Option("--stl-skull", help="With the implant's STL, also the complete skull's (~100-150 MB per case at 512^2 x Z; implies --stl).")] = False,
    smooth: Annotated[bool, typer.Option("--smooth", help="Smooth the STL meshes (Taubin filter), keeping them within 0.5 mm of the voxel surface.")] = False,
    out_format: Annotated[str, typer.Option("--format", help="Output volumes: auto (the input's format: NRRD stays NRRD, NIfTI and DICOM give NIfTI), nifti or nrrd.")] = "auto",
) -> Path:
    """Reconstruct complete skulls and implants for a defective skull or a folder of them, on their own grid.

    Inputs are skull masks, or CT scans in HU with --ct (DICOM series or NIfTI/NRRD; the skull mask made from the CT goes to OUT/ct_mask/). Outputs are on each input's own grid, NRRD for NRRD inputs and NIfTI otherwise. See docs/how-to/ct-dicom.md.
    """
    from .inference.predict import check_output_options, predict_folder

    _at_least("--batch-size", batch_size, 1)
    bone_hu = _ct_options(ct, bone_hu, threshold)
    stl = check_output_options(stl, stl_skull, smooth, out_format)  # before the shipped weights are named on stderr
    console = _console(stderr=True)
    if checkpoint is None:
        from .inference.shipped import shipped_checkpoints

        if stage2 is not None:
            raise InputError("--stage2: needs --checkpoint (without both, the shipped stage 1 + stage 2 are used)")
        checkpoint, stage2 = shipped_checkpoints()
        console.print(f"using the shipped weights: {checkpoint} + {stage2}")
    if mirror and stage2 is None:
        raise InputError("--mirror: mirrors stage 2's box, and there is no stage 2 (give --stage2, or neither --checkpoint nor --stage2)")
    with _bar("predict", console) as progress:
        rows = predict_folder(
            checkpoint, inp, out, stl=stl, batch_size=batch_size, threshold=threshold, device=device, overwrite=overwrite,
            # markup off: file names may hold [brackets]; soft_wrap: one message, one line
            progress=progress, warn=lambda msg: console.print(msg, style="yellow", markup=False, highlight=False, soft_wrap=True),
            stage2=stage2, keep_stage1=keep_stage1, mirror=mirror, ct=ct, bone_hu=bone_hu, series=series,
            stl_skull=stl_skull, smooth=smooth, out_format=out_format,
        )
    n_empty = sum(r["implant_empty"] for r in rows)
    console.print(f"{len(rows)} cases -> {out} (complete/, implant/{', stl/' if stl else ''}); empty implants: {n_empty}")
    return Path(out)


def export_bundle_command(
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write (configs/, models/, docs/, LICENSE).")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Stage-1 checkpoint from 'skullrec train' (default: the shipped weights, stage 1 + stage 2).")] = None,
    stage2: Annotated[Optional[Path], typer.Option("--stage2", help="Stage-2 checkpoint from 'skullrec train-implant' (needs --checkpoint).")] = None,
    licence: Annotated[Optional[Path], typer.Option("--license", help="Text file shipped as the bundle's LICENSE (default: the shipped weights' licence).")] = None,
    overwrite: OVERWRITE = False,
) -> Path:
    """Export the stage-1 + stage-2 predictor as a MONAI bundle (safetensors weights, run with 'python -m monai.bundle run')."""
    from .inference.bundle import export_bundle

    result = export_bundle(out, stage1=checkpoint, stage2=stage2, licence=licence, overwrite=overwrite)
    print(f"wrote the MONAI bundle {result.out} ({', '.join(result.files)})")
    print(f"run it: cd {result.out} && python -m monai.bundle run --config_file configs/inference.json "
          "--meta_file configs/metadata.json --dataset_dir IN --output_dir OUT")
    return result.out


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """Print an evaluation summary as a rich table (mean ± std, median, IQR) with the failed/skipped counts."""
    from rich.table import Table

    console = console or _console()
    title = f"target: {summary['target']}   HD95: {summary['hd95_definition']}   cases: {summary['n_cases']}"
    table = Table(title=title)
    for col in ("metric", "mean ± std", "median", "IQR (q1-q3)", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    labels = {
        "dsc": ("DSC", 4), "bdsc": ("bDSC", 4), "hd_mm": ("HD (mm)", 3), "hd95_mm": (f"HD95 {summary['hd95_definition']} (mm)", 3),
        "hd_vox": ("HD (voxels)", 3), "hd95_vox": (f"HD95 {summary['hd95_definition']} (voxels)", 3),
    }
    for key, (label, digits) in labels.items():
        s = summary["metrics"][key]
        if s["n"] == 0:
            table.add_row(label, "n/a (no --defective)" if key == "bdsc" else "n/a", "", "", "0")
            continue
        table.add_row(
            label, f"{_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)}", _fmt(s["median"], digits),
            f"{_fmt(s['iqr'], digits)} ({_fmt(s['q1'], digits)}-{_fmt(s['q3'], digits)})", str(s["n"]),
        )
    console.print(table)
    failed = summary["n_failed"]
    line = f"failed: {failed}"
    if failed:
        shown = ", ".join(summary["failed_cases"][:10]) + (", ..." if failed > 10 else "")
        line += f" ({shown}; counted with worst values: DSC 0, HD = volume diagonal)"
    console.print(line)
    if summary["n_skipped"]:
        shown = ", ".join(summary["skipped_cases"][:10]) + (", ..." if summary["n_skipped"] > 10 else "")
        console.print(f"skipped (no partner): {summary['n_skipped']} ({shown})")


def evaluate_command(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predictions.")],
    truth: Annotated[Path, typer.Option("--truth", help="Folder of ground truths (same case ids).")],
    out: Annotated[Path, typer.Option("--out", help="Per-case CSV; the summary goes beside it as .summary.json.")],
    defective: Annotated[Optional[Path], typer.Option("--defective", help="Folder of defective skulls (needed for bDSC).")] = None,
    target: Annotated[str, typer.Option(help="skull (reconstruction vs complete skull) or implant.")] = "skull",
    hd95: Annotated[str, typer.Option("--hd95", help="max (MONAI: max of directed 95th percentiles) or pooled (AutoImplant/MedPy).")] = "max",
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Skip cases without a partner and report the count.")] = False,
    threshold: THRESHOLD = None,
    overwrite: OVERWRITE = False,
    workers: Annotated[int, typer.Option(help="Worker processes (at most 4; 2 on a 2-core machine for 512^2 x Z skulls); values do not depend on it.")] = 1,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score predictions against ground truth: DSC, bDSC, HD and HD95 (mm and voxels)."""
    from .evaluation.evaluate import check_outputs, evaluate_folders, write_results
    from .evaluation.metrics import HD95_DEFINITIONS, TARGETS

    check_choice("--target", target, TARGETS)
    check_choice("--hd95", hd95, HD95_DEFINITIONS)
    out = Path(out)
    inputs = (pred, truth, defective)  # the CSV and its summary must never replace a scored file
    check_outputs(out, overwrite, inputs)  # refuse before spending time on the evaluation
    console = _console()
    scored = itertools.count(1)
    with _bar("evaluate", _console(stderr=True)) as progress:  # stderr: stdout carries only the summary
        rows, summary = evaluate_folders(
            pred, truth, defective=defective, target=target, hd95=hd95, skip_missing=skip_missing,
            threshold=threshold, progress=lambda cid: progress(next(scored), None), workers=workers,
        )
    csv_path, json_path = write_results(out, rows, summary, overwrite=overwrite, inputs=inputs)
    print_summary(summary, console)
    console.print(f"wrote {csv_path} and {json_path}")
    return rows, summary


def experiment_command(
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML (e.g. configs/paper_skull.yaml).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Results folder (default from the config).")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Shrink epochs and cases by this factor (e.g. 0.1) for a CPU-sized run.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override an experiment key (repeatable).")] = None,
    device: DEVICE = "auto",
    jobs: Annotated[int, typer.Option(help="Runs trained concurrently (useful on one GPU).")] = 1,
) -> Path:
    """Train the whole method / lambda / seed sweep, evaluate both defect sets, write tables and figures."""
    from .experiment.sweep import run_experiment

    console = _console()
    errs = _console(stderr=True)
    with _bar("evaluating checkpoints", errs) as progress:
        result = run_experiment(
            config, out=out, scale=scale, overrides=overrides, device=device, jobs=jobs,
            log=lambda msg: console.print(msg, markup=False), done=lambda msg: errs.print(msg, markup=False), progress=progress,
        )
    sys.stdout.write(result.table_md)  # plain text: rich would wrap the markdown table rows
    if result.reference_md:
        sys.stdout.write("\n" + result.reference_md)
    console.print(f"training {result.train_s:.0f} s, total {result.total_s:.0f} s; results in {result.out}/ ({', '.join(result.written)})")
    return result.out


def sites_command(
    source: Annotated[Path, typer.Option("--in", help="Data set whose complete skulls are split (its train split by default).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: site1/ .. siteN/, each a data set.")],
    n_sites: Annotated[int, typer.Option("--n-sites", help="Number of sites.")] = 3,
    weights: Annotated[Optional[list[float]], typer.Option("--weight", help="Relative size of each site (repeat per site; default 1, 2, .., N).")] = None,
    set2_fraction: Annotated[Optional[list[float]], typer.Option("--set2-fraction", help="Share of set-2 defects at each site (repeat per site; default 0 .. 1).")] = None,
    eval_fraction: Annotated[float, typer.Option(help="Share of each site's skulls held out (eval_site).")] = 0.25,
    split: Annotated[str, typer.Option(help="Split of --in to take the complete skulls from.")] = "train",
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N skulls.")] = None,
    seed: SEED = 0,
    overwrite: OVERWRITE = False,
) -> list[dict[str, Any]]:
    """Split one data set into N non-IID sites (different sizes and defect mixes) for 'skullrec federate'."""
    from .federated.sites import make_sites, summarise_sites

    folders = make_sites(source, out, n_sites, seed=seed, split=split, weights=weights, set2_fraction=set2_fraction,
                         eval_fraction=eval_fraction, max_cases=max_cases, overwrite=overwrite)
    rows = summarise_sites(folders)
    for r in rows:
        print(f"{r['site']}: {r['train']} training + {r['held_out']} held-out skulls, {r['set2_cases']} with set-2 defects "
              f"(p = {r['set2_fraction']:.2f}) -> {r['folder']}", flush=True)
    return rows


def federate_command(
    config: Annotated[Optional[Path], typer.Option("--config", help="Federation YAML (e.g. configs/federate.yaml).")] = None,
    sites: Annotated[Optional[list[Path]], typer.Option("--site", help="A site's data-set folder (repeatable; replaces the config's sites).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a federation key: --set rounds=5 (repeatable).")] = None,
    train_overrides: Annotated[Optional[list[str]], typer.Option("--train-set", help="Override a training-config key: --train-set train.method=sam (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Federation folder (default from the config).")] = None,
    superlink: Annotated[Optional[str], typer.Option("--superlink", help="Run on real sites: a SuperLink connection named in Flower's config.toml; --site then names the sites.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the federation in this folder (redoes an interrupted round).")] = None,
    overwrite: OVERWRITE = False,
) -> None:
    """Federated training on Flower: FedAvg or FedAvg + SWA over site folders, each site training locally."""
    from .extras import require_extra
    from .federated.run import FederationFailed, federate

    require_extra("skullrec federate", "federated")

    overrides = (overrides or []) + ([f"superlink={superlink}"] if superlink else [])
    try:
        folder, state = federate(config, sites or [], overrides, train_overrides or [], out, resume, overwrite,
                                 echo=lambda s: print(s, flush=True))
    except FederationFailed as exc:  # a failed round is not a user error: exit code 1
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print(f"done: {folder / 'final.safetensors'} (round {state['round']}; metrics per round and site in {folder / 'metrics.jsonl'})", flush=True)


def view_command(
    data: Annotated[Optional[Path], typer.Option("--data", help="Data-set folder to browse.")] = None,
    runs: Annotated[Optional[Path], typer.Option("--runs", help="Folder of run folders (checkpoints).")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="A results CSV from evaluate/experiment.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
    inp: Annotated[Optional[Path], typer.Option("--in", help="Open this defective skull: a volume file or a DICOM series folder (with --ct: a CT in HU).")] = None,
    ct: CT = False,
    bone_hu: BONE_HU = None,
    series: SERIES = None,
) -> None:
    """Open the Streamlit viewer for reconstructed skulls."""
    from .extras import require_extra
    from .viewer.launch import DEFAULT_DATA, DEFAULT_RUN_ROOTS, ViewerSettings, launch

    require_extra("skullrec view", "viewer", ["streamlit", "plotly"])  # the page's imports (matplotlib is the experiment's)

    bone_hu = _ct_options(ct, bone_hu, None)
    if (ct or series) and inp is None:
        raise InputError(f"{'--ct' if ct else '--series'}: applies to --in (give the CT or DICOM series with --in)")
    if inp is not None:
        from .io import choose_dicom_series, is_dicom_folder, is_volume_file

        if not Path(inp).exists():
            raise InputError(f"{inp}: no such file or folder (given as --in)")
        if is_dicom_folder(inp):
            choose_dicom_series(inp, series)  # several series and no --series: listed now, not in the browser
        elif not (Path(inp).is_file() and is_volume_file(inp)):
            raise InputError(f"{inp}: neither a volume file (.nii, .nii.gz, .nrrd, .nhdr) nor a DICOM series folder (given as --in)")
    if not 1 <= int(port) <= 65535:
        raise InputError(f"--port: must be between 1 and 65535, got {port}")
    if results is not None and not Path(results).is_file():
        raise InputError(f"{results}: no such results CSV")
    for flag, folder in (("--data", data), ("--runs", runs)):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{folder}: no such folder (given as {flag})")
    # Absolute paths: streamlit keeps the working directory, but the page must not depend on it.
    settings = ViewerSettings(
        data=Path(data or DEFAULT_DATA).resolve(),
        runs=(Path(runs).resolve(),) if runs is not None else tuple(r.resolve() for r in DEFAULT_RUN_ROOTS),
        results=Path(results).resolve() if results is not None else None,
        input=Path(inp).resolve() if inp is not None else None,
        ct_bone_hu=bone_hu if ct else None,
        series=tuple(series or ()),
    )
    where = ", ".join(str(r) for r in settings.runs)
    print(f"skullrec view: http://{host}:{port}  (data {settings.data}; checkpoints under {where}; Ctrl-C stops)", flush=True)
    code = launch(settings, host, port)
    if code != 0:
        raise InputError(f"streamlit exited with code {code} (is port {port} free?)")


def prepare_implant_command(
    prepared: Annotated[Path, typer.Option("--prepared", help="A data set from 'skullrec prepare' (its train_ids and source folders are used).")],
    stage1: Annotated[Path, typer.Option("--stage1", help="A stage-1 checkpoint from 'skullrec train'.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder of stage-2 samples.")],
    kinds: Annotated[str, typer.Option(help=f"Defect kinds, comma-separated: {KIND_NAMES} ({HELD_OUT} is held out of training: needs --allow-held-out).")] = "skullfix,set1,set2",
    allow_held_out: Annotated[bool, typer.Option("--allow-held-out", help=f"Allow the held-out kind ({HELD_OUT}); its scores are then no longer 'unlike training'.")] = False,
    box_mm: Annotated[float, typer.Option(help="Edge of the cubic box around the defect (mm).")] = 128.0,
    grid: Annotated[int, typer.Option(help="The box is resampled to GRID^3 voxels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the defects and box offsets.")] = 0,
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N training skulls.")] = None,
    overwrite: OVERWRITE = False,
    workers: Annotated[int, typer.Option(help="Worker processes (at most 4); the samples do not depend on it.")] = 1,
) -> Path:
    """Stage-2 training samples at the skulls' own resolution (training skulls only)."""
    from .inference.samples import build_stage2_data

    _at_least("--box-mm", box_mm, 1e-6)
    _at_least("--grid", grid, 8)
    console = _console(stderr=True)
    with _bar("prepare-implant", console) as progress:
        recs = build_stage2_data(prepared, stage1, out, kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                                 box_mm=box_mm, grid=grid, seed=seed, max_cases=max_cases, overwrite=overwrite,
                                 progress=progress, workers=workers, log=lambda s: console.print(f"[yellow]{s}[/]"),
                                 allow_held_out=allow_held_out)
    console.print(f"{len(recs)} samples -> {out}")
    return Path(out)


def prepare_eval_command(
    prepared: Annotated[Path, typer.Option("--prepared", help="A data set from 'skullrec prepare' (its eval_ids and source folders are used).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: complete/ and KIND/{defective,implant}/ at each skull's own grid.")],
    kinds: Annotated[str, typer.Option(help=f"Defect kinds, comma-separated: {KIND_NAMES} (the held-out {HELD_OUT} included).")] = "skullfix,set1,set2",
    seed: Annotated[int, typer.Option(help="Seed of the project's defects (set 1, set 2 and the named kinds).")] = 0,
    overwrite: OVERWRITE = False,
    workers: Annotated[int, typer.Option(help="Worker processes (at most 4); the files do not depend on it.")] = 1,
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N evaluation skulls.")] = None,
) -> Path:
    """The held-out skulls' defects at their own resolution, to score 'predict' with 'evaluate'."""
    from .data.stage2 import build_native_eval_sets

    console = _console(stderr=True)
    with _bar("prepare-eval", console) as progress:
        meta = build_native_eval_sets(prepared, out, kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                                      seed=seed, overwrite=overwrite, progress=progress, workers=workers, max_cases=max_cases)
    console.print(f"{len(meta['eval_ids'])} evaluation skulls x {len(meta['kinds'])} defect kinds -> {out}")
    return Path(out)


def train_implant_command(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML stage-2 config (configs/stage2.yaml).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set train.epochs=5 (repeatable).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the stage-2 run in this folder.")] = None,
    overwrite: OVERWRITE = False,
) -> None:
    """Train stage 2 (the implant UNet in a box around the defect)."""
    from .training.stage2 import load_stage2_config, train_implant

    if config is None and resume is None:
        raise InputError("--config: required (or --resume RUN_DIR)")
    if resume is not None:
        train_implant(load_stage2_config(None), resume, resume=True, log=lambda s: print(s, flush=True))
        return
    cfg = load_stage2_config(config, overrides or [])
    train_implant(cfg, cfg.out, overwrite=overwrite, log=lambda s: print(s, flush=True), inputs=(config,))


# The commands, in the order `skullrec --help` lists them; user_errors turns InputError into one line + exit 2.
for _name, _command in (
    ("synth", synth_command),
    ("defects", defects_command),
    ("prepare", prepare_command),
    ("train", train_command),
    ("flatness", flatness_command),
    ("prepare-implant", prepare_implant_command),
    ("prepare-eval", prepare_eval_command),
    ("train-implant", train_implant_command),
    ("predict", predict_command),
    ("export-bundle", export_bundle_command),
    ("evaluate", evaluate_command),
    ("experiment", experiment_command),
    ("sites", sites_command),
    ("federate", federate_command),
    ("view", view_command),
):
    app.command(name=_name)(user_errors(_command))


def main() -> None:
    """Console entry point."""
    import signal

    # Past the file-size limit (ulimit -f) the kernel sends SIGXFSZ, which kills the process by default
    # (Python's own start-up ignores it, an embedding program may not): ignored, the write fails with
    # EFBIG, which the writer names and user_errors prints as one line, and the output stays as it was.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()


if __name__ == "__main__":
    sys.exit(main())
