"""The ``skullrec`` command line (typer).

Each command is a thin wrapper: it parses options and calls one function of the module that owns
the work, so the modules stay usable from Python. Heavy modules are imported inside the commands
to keep ``skullrec --help`` fast. A user mistake (:class:`skullrec.errors.InputError`) is printed as
one line ``error: ...`` on stderr with exit code 2, never as a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import InputError

app = typer.Typer(
    name="skullrec",
    help="3D skull shape reconstruction: data, training with relative flatness (FAM), prediction, evaluation, viewer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn):
    """Turn InputError into a one-line message and exit code 2, KeyboardInterrupt into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace an output folder that already holds results.")]
SEED = Annotated[int, typer.Option(help="Seed for everything random (same seed, same bytes).")]


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output data-set folder (layout: see skullrec.data.layout).")] = Path("data/synthetic"),
    n_train: Annotated[int, typer.Option(help="Number of training skulls.")] = 100,
    n_eval: Annotated[int, typer.Option(help="Number of evaluation skulls (each gets a set-1 and a set-2 defect).")] = 20,
    size: Annotated[int, typer.Option(help="Edge length of the cubic volumes.")] = 64,
    seed: SEED = 0,
    overwrite: OVERWRITE = False,
) -> None:
    """Generate the procedural skull data set (the embedded default) with set-1 and set-2 defects."""
    from .data.synth import synth_command

    synth_command(out=out, n_train=n_train, n_eval=n_eval, size=size, seed=seed, overwrite=overwrite)


@app.command()
@user_errors
def defects(
    complete: Annotated[Path, typer.Option("--in", help="Folder of complete skulls (.nii, .nii.gz, .nrrd).")],
    out: Annotated[Path, typer.Option("--out", help="Output data-set folder.")],
    seed: SEED = 0,
    eval_fraction: Annotated[float, typer.Option(help="Fraction of cases that go to the evaluation sets.")] = 0.2,
    threshold: Annotated[Optional[float], typer.Option(help="Binarise non-binary inputs as value > T.")] = None,
    overwrite: OVERWRITE = False,
) -> None:
    """Cut set-1 (training-like) and set-2 (different) defects into any folder of complete skulls."""
    from .data.defects import defects_command

    defects_command(complete=complete, out=out, seed=seed, eval_fraction=eval_fraction, threshold=threshold, overwrite=overwrite)


@app.command()
@user_errors
def prepare(
    complete: Annotated[Path, typer.Option("--in", help="Folder of complete skulls (any size and spacing).")],
    out: Annotated[Path, typer.Option("--out", help="Output data-set folder.")],
    defective: Annotated[Optional[Path], typer.Option("--defective", help="Folder of the matching defective skulls (same case ids).")] = None,
    size: Annotated[int, typer.Option(help="Edge length of the prepared cubic volumes.")] = 64,
    margin_mm: Annotated[float, typer.Option(help="Margin around the bone's bounding box, in mm.")] = 4.0,
    eval_fraction: Annotated[float, typer.Option(help="Fraction of cases held out for evaluation (set 1 and set 2 defects).")] = 0.2,
    seed: SEED = 0,
    threshold: Annotated[Optional[float], typer.Option(help="Binarise non-binary inputs as value > T.")] = None,
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N cases.")] = None,
    overwrite: OVERWRITE = False,
) -> None:
    """Turn real skulls (e.g. SkullFix NRRD) into a 64^3 data set in the project's layout."""
    from .data.build import prepare_command

    prepare_command(
        complete=complete, out=out, defective=defective, size=size, margin_mm=margin_mm, eval_fraction=eval_fraction,
        seed=seed, threshold=threshold, max_cases=max_cases, overwrite=overwrite,
    )


@app.command()
@user_errors
def train(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML config (see configs/); with --resume, defaults to the run's own.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set fam.lam=0.02 (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder (default runs/NAME).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the config differs from the run's.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    overwrite: OVERWRITE = False,
) -> None:
    """Train the autoencoder (baseline, fam, sam or asam)."""
    from .training.trainer import train_command

    train_command(config=config, overrides=set_ or [], run_dir=run_dir, resume=resume, force=force, device=device, overwrite=overwrite)


@app.command()
@user_errors
def flatness(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file written by 'skullrec train'.")],
    data: Annotated[Path, typer.Option("--data", help="Data-set folder.")],
    split: Annotated[str, typer.Option(help="Split to measure on.")] = "train",
    samples: Annotated[int, typer.Option(help="Hutchinson probes.")] = 64,
    max_cases: Annotated[Optional[int], typer.Option(help="Use only the first N cases.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Print Tr(H), ||w||^2, kappa-hat and neuron-wise kappa of the configured layer on a data set."""
    from .flatness.measure import flatness_command

    flatness_command(checkpoint=checkpoint, data=data, split=split, samples=samples, max_cases=max_cases, device=device)


@app.command()
@user_errors
def predict(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file written by 'skullrec train'.")],
    inp: Annotated[Path, typer.Option("--in", help="Folder of defective skulls (.nii, .nii.gz, .nrrd; any size).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: complete/ and implant/ (and stl/).")],
    stl: Annotated[bool, typer.Option("--stl", help="Also write STL meshes (mm) of skull and implant.")] = False,
    batch_size: Annotated[int, typer.Option(help="Volumes per forward pass.")] = 8,
    threshold: Annotated[Optional[float], typer.Option(help="Binarise non-binary inputs as value > T.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    overwrite: OVERWRITE = False,
) -> None:
    """Reconstruct complete skulls and implants for a folder of defective skulls, on their own grid."""
    from .inference.predict import predict_command

    predict_command(checkpoint=checkpoint, inp=inp, out=out, stl=stl, batch_size=batch_size, threshold=threshold, device=device, overwrite=overwrite)


@app.command()
@user_errors
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predictions.")],
    truth: Annotated[Path, typer.Option("--truth", help="Folder of ground truths (same case ids).")],
    out: Annotated[Path, typer.Option("--out", help="Per-case CSV; the summary goes beside it as .summary.json.")],
    defective: Annotated[Optional[Path], typer.Option("--defective", help="Folder of defective skulls (needed for bDSC).")] = None,
    target: Annotated[str, typer.Option(help="skull (reconstruction vs complete skull) or implant.")] = "skull",
    hd95: Annotated[str, typer.Option("--hd95", help="max (MONAI: max of directed 95th percentiles) or pooled (AutoImplant/MedPy).")] = "max",
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Skip cases without a partner and report the count.")] = False,
    threshold: Annotated[Optional[float], typer.Option(help="Binarise non-binary inputs as value > T.")] = None,
    overwrite: OVERWRITE = False,
) -> None:
    """Score predictions against ground truth: DSC, bDSC, HD and HD95 (mm and voxels)."""
    from .evaluation.evaluate import evaluate_command

    evaluate_command(
        pred=pred, truth=truth, out=out, defective=defective, target=target, hd95=hd95,
        skip_missing=skip_missing, threshold=threshold, overwrite=overwrite,
    )


@app.command()
@user_errors
def experiment(
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML (e.g. configs/paper_skull.yaml).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Results folder (default from the config).")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Shrink epochs and cases by this factor (e.g. 0.1) for a CPU-sized run.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override an experiment key (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    jobs: Annotated[int, typer.Option(help="Runs trained concurrently (useful on one GPU).")] = 1,
) -> None:
    """Train the whole method / lambda / seed sweep, evaluate both defect sets, write tables and figures."""
    from .experiment.sweep import experiment_command

    experiment_command(config=config, out=out, scale=scale, overrides=set_ or [], device=device, jobs=jobs)


@app.command()
@user_errors
def view(
    data: Annotated[Optional[Path], typer.Option("--data", help="Data-set folder to browse.")] = None,
    runs: Annotated[Optional[Path], typer.Option("--runs", help="Folder of run folders (checkpoints).")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="A results CSV from evaluate/experiment.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
) -> None:
    """Open the Streamlit viewer for reconstructed skulls."""
    from .viewer.launch import view_command

    view_command(data=data, runs=runs, results=results, host=host, port=port)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
