"""The paper's skull experiment as one resumable command: train a sweep, evaluate, tabulate, plot.

``skullrec experiment --config configs/paper_skull.yaml`` trains every (method, seed) run of the
sweep (baseline, FAM at several lambdas, SAM, ASAM), reads the checkpoints of the chosen epochs
(the paper reads 100 and 200), reconstructs both defect sets, and writes into one results folder:

- ``table2.md`` / ``table2.csv``: DSC, HD, HD95 per target, method, set and checkpoint, mean ± 95 % CI
  over seeds (t-interval of the per-seed means), with a collapse flag. Targets: ``skull`` (the
  reconstructed complete skull vs the true one, the paper's choice) and ``implant`` (reconstruction
  AND NOT defective vs the true implant, AutoImplant's choice; it is what separates the defect sets,
  since the defect is about a tenth of the skull);
- ``per_case.csv``: every case of every run, set and checkpoint;
- ``fig1_training_loss.png``: training Dice-loss curves per method (mean over seeds);
- ``fig2_boxplots.png``: DSC, HD, HD95 per method and set at the last checkpoint (cases pooled over seeds);
- ``vs_reference.md`` / ``.csv``: every method minus the baseline, paired by seed, with 95 % CIs;
- ``collapse.csv``: per run, the mean pairwise DSC between reconstructions of *different* cases
  (near 1 means the model outputs one "universal" skull whatever the input).

Runs are trained in subprocesses (``python -m skullrec train``) so several can share one GPU
(``--jobs``); a finished run (its final checkpoint exists) is reused, an unfinished one resumed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import ExperimentConfig, MethodSpec, dump_config, load_config, load_experiment
from ..errors import InputError
from ..extras import require_extra
from ..io import atomic_write_text, json_default
from ..training.run_dir import CONFIG_FILE, SWEEP_CONFIGS, SWEEP_RUNS, checkpoint_path, run_finished, sweep_config, sweep_log, sweep_run_dir
from ..utils import Progress, resolve_device
from .report import figures, table2, table2_markdown, versus_reference, versus_reference_markdown


def run_overrides(exp: ExperimentConfig, spec: MethodSpec, seed: int) -> list[str]:
    """The ``--set`` overrides that turn the base training config into one run of the sweep."""
    sets = [
        f"name={spec.name}_seed{seed}",
        f"seed={seed}",
        f"data.root={exp.data_root}",
        f"data.eval_splits={json.dumps(exp.eval_splits)}",
        f"train.method={spec.method}",
        f"train.epochs={exp.epochs}",
        f"train.checkpoint_epochs={json.dumps(exp.checkpoint_epochs)}",
        f"fam.lam={spec.lam}",
    ]
    if exp.max_train_cases is not None:
        sets.append(f"data.max_train_cases={exp.max_train_cases}")
    if exp.max_eval_cases is not None:
        sets.append(f"data.max_eval_cases={exp.max_eval_cases}")
    return sets + list(exp.set) + list(spec.set)


def _train_run(cfg_path: Path, run_dir: Path, device: str, log_path: Path) -> tuple[Path, int, float]:
    """Train (or resume) one run in a subprocess; returns (run_dir, exit code, seconds)."""
    if run_finished(run_dir):
        return run_dir, 0, 0.0
    cmd = [sys.executable, "-m", "skullrec", "train", "--config", str(cfg_path), "--device", device]
    cmd += ["--resume", str(run_dir)] if (run_dir / CONFIG_FILE).is_file() else ["--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return run_dir, rc, time.perf_counter() - t0


def train_sweep(
    exp: ExperimentConfig, out: Path, device: str, jobs: int, done: Callable[[str], None] | None = None
) -> dict[tuple[str, int], Path]:
    """Train every (method, seed) run not yet finished; returns the run folders. ``done(message)`` per finished run."""
    done = done or (lambda msg: None)
    (out / SWEEP_RUNS).mkdir(parents=True, exist_ok=True)
    (out / SWEEP_CONFIGS).mkdir(parents=True, exist_ok=True)
    tasks = []
    # Seed-major order: every method's seed-0 run finishes before any seed-1 run starts, so a sweep
    # stopped early still holds complete seeds that can be tabulated (``--set 'seeds=[0]'``).
    for seed in exp.seeds:
        for spec in (m for m in exp.methods if m.trains_seed(seed)):
            overrides = run_overrides(exp, spec, seed)
            cfg = load_config(exp.base_config, overrides)  # validates every run before any training starts
            cfg_path = sweep_config(out, spec.name, seed)
            atomic_write_text(cfg_path, dump_config(cfg))
            tasks.append(((spec.name, seed), cfg_path, sweep_run_dir(out, spec.name, seed)))
    runs: dict[tuple[str, int], Path] = {}
    if exp.jobs_mode == "batched":
        forward = None if exp.batched_forward == "auto" else exp.batched_forward
        tasks = _train_batched_groups(tasks, device, done, runs, forward)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(_train_run, cfg_path, run_dir, device, sweep_log(out, *key)): key
            for key, cfg_path, run_dir in tasks
        }
        for fut in concurrent.futures.as_completed(futures):
            key = futures[fut]
            run_dir, rc, secs = fut.result()
            if rc != 0:
                log = sweep_log(out, *key)
                tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
                raise InputError(f"run {key[0]} seed {key[1]} failed (exit {rc}): {' '.join(tail)}; see {log}")
            done(f"done {key[0]} seed {key[1]}" + (f" ({secs:.0f} s)" if secs else " (reused)"))
            runs[key] = run_dir
    return runs


def _train_batched_groups(tasks: list, device: str, done: Callable[[str], None], runs: dict[tuple[str, int], Path],
                          forward: str | None = None) -> list:
    """jobs_mode batched: train each group of new runs that differ only in their seed together (in this process).

    Fills ``runs`` with them and returns the tasks left for the subprocesses: runs that cannot be batched
    (not baseline), are alone in their group, or have a folder already (finished ones are reused,
    unfinished ones resumed by the ordinary trainer).
    """
    from ..training.batched import batch_key, train_batched

    groups: dict[str, list] = {}
    rest = []
    for task in tasks:
        _, cfg_path, run_dir = task
        cfg = load_config(cfg_path)
        k = batch_key(cfg) if not (run_dir / CONFIG_FILE).exists() else None
        if k is None:
            rest.append(task)
        else:
            groups.setdefault(k, []).append((task, cfg))
    for members in groups.values():
        if len(members) < 2:
            rest += [task for task, _ in members]
            continue
        t0 = time.perf_counter()
        train_batched([cfg for _, cfg in members], [task[2] for task, _ in members], device, forward=forward)
        secs = time.perf_counter() - t0
        for (key, _, run_dir), _ in members:
            done(f"done {key[0]} seed {key[1]} ({secs:.0f} s, {len(members)} runs batched)")
            runs[key] = run_dir
    return rest


def _pairwise_dsc(recon: np.ndarray) -> float:
    """Mean Dice between reconstructions of different cases (collapse check)."""
    from .references import dice_matrix

    dsc = dice_matrix(recon, recon)
    iu = np.triu_indices(len(recon), k=1)
    return float(dsc[iu].mean()) if len(iu[0]) else float("nan")


def evaluate_runs(
    exp: ExperimentConfig, runs: dict[tuple[str, int], Path], device: str, cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[list[dict], list[dict]]:
    """Reconstruct every eval split with every run's chosen checkpoints; per-case rows and collapse rows.

    With ``cache_dir``, each (run, checkpoint, split) result is stored as JSON keyed by the checkpoint
    file's size and mtime and the scoring settings, so re-running a grown sweep only scores what is new.
    ``progress(done, total)`` is called after each (run, checkpoint, split).
    """
    from ..data.layout import load_split
    from ..nets.checkpoint import load_checkpoint

    dev = resolve_device(device)
    report = progress or (lambda done, total: None)
    splits = {s: load_split(exp.data_root, s, exp.max_eval_cases) for s in exp.eval_splits}
    rows: list[dict] = []
    collapse: list[dict] = []
    truth_pairwise: dict[str, float] = {}  # depends on the split only
    jobs = [(key, run_dir, epoch) for key, run_dir in sorted(runs.items()) for epoch in exp.checkpoint_epochs]
    total, finished = len(jobs) * len(splits), 0
    report(0, total)
    for (method, seed), run_dir, epoch in jobs:
        ckpt = checkpoint_path(run_dir, epoch)
        stat = ckpt.stat()
        model = None
        for split_name, split in splits.items():
            key = {"checkpoint": str(ckpt), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "data_root": exp.data_root,
                   "ids": split.ids, "targets": exp.targets, "hd95": exp.hd95, "implant": IMPLANT_SCORING}
            cache = cache_dir / f"{method}_seed{seed}_epoch{epoch}_{split_name}.json" if cache_dir else None
            cached = json.loads(cache.read_text()) if cache is not None and cache.is_file() else None
            if cached is None or cached.get("key") != key:
                if model is None:
                    model, _, _ = load_checkpoint(ckpt, device=dev)
                    model.eval()
                recon = _reconstruct(model, split.defective, dev)
                case_rows = score_reconstructions(recon, split, exp)
                if split_name not in truth_pairwise:
                    truth_pairwise[split_name] = _pairwise_dsc(split.complete)
                cached = {"key": key, "rows": case_rows,
                          "pairwise_dsc": _pairwise_dsc(recon), "truth_pairwise_dsc": truth_pairwise[split_name]}
                if cache is not None:
                    atomic_write_text(cache, json.dumps(cached, default=json_default))
            for r in cached["rows"]:
                rows.append({"method": method, "seed": seed, "epoch": epoch, "set": split_name, **r})
            collapse.append({"method": method, "seed": seed, "epoch": epoch, "set": split_name,
                             "pairwise_dsc": cached["pairwise_dsc"], "truth_pairwise_dsc": cached["truth_pairwise_dsc"]})
            finished += 1
            report(finished, total)
    return rows, collapse


# How the implant target is derived (part of the score cache key: changing it re-scores old caches).
IMPLANT_SCORING = "predict: complete AND NOT defective where the model added bone, islands < 100 mm^3 removed"


def score_reconstructions(recon: np.ndarray, split: Any, exp: ExperimentConfig) -> list[dict]:
    """Per-case rows of every target for reconstructions ``recon`` (N, S, S, S) of ``split``'s defective skulls.

    The implant is what ``skullrec predict`` writes (skullrec.inference.predict.implant_from_reconstruction):
    on the model's own grid, "where the model added bone" is reconstruction AND NOT defective, and islands
    below MIN_ISLAND_MM3 are dropped. Trained methods and reference predictors go through this one function.
    """
    from ..evaluation.evaluate import evaluate_arrays
    from ..inference.predict import implant_from_reconstruction

    rows: list[dict] = []
    for target in exp.targets:
        if target == "skull":
            pred, truth = recon, split.complete
        else:
            pred = np.stack([
                implant_from_reconstruction(r, d, r.astype(bool) & ~d.astype(bool), a)[0]
                for r, d, a in zip(recon, split.defective, split.affines)
            ]).astype(np.uint8)
            truth = split.implant
        rows += evaluate_arrays(pred, truth, split.spacings, defective=split.defective, hd95=exp.hd95, ids=split.ids, target=target)
    return rows


def evaluate_references(exp: ExperimentConfig, progress: Progress | None = None) -> tuple[list[dict], list[dict]]:
    """Rows and collapse rows of the reference predictors (``exp.references``) on every eval split.

    One "seed" (0); the same rows are listed under every checkpoint epoch so that each block of Table 2
    has them beside the methods. The training skulls are the training split's first ``max_train_cases``.
    """
    from ..data.layout import load_split
    from .references import mean_shape, reference_predictions

    if not exp.references:
        return [], []
    train = load_split(exp.data_root, "train", exp.max_train_cases)
    splits = {s: load_split(exp.data_root, s, exp.max_eval_cases) for s in exp.eval_splits}
    rows: list[dict] = []
    collapse: list[dict] = []
    report = progress or (lambda done, total: None)
    total, finished = len(exp.references) * len(splits), 0
    truth_pw = {name: _pairwise_dsc(split.complete) for name, split in splits.items()}
    mean_mask = mean_shape(train.complete)[0] if "mean_shape" in exp.references else None  # split-independent
    for ref in exp.references:
        for split_name, split in splits.items():
            recon = reference_predictions(ref, train.complete, train.defective, split.defective, mean_mask=mean_mask)
            case_rows = score_reconstructions(recon, split, exp)
            pw = _pairwise_dsc(recon)
            for epoch in exp.checkpoint_epochs:
                rows += [{"method": f"ref:{ref}", "seed": 0, "epoch": epoch, "set": split_name, **r} for r in case_rows]
                collapse.append({"method": f"ref:{ref}", "seed": 0, "epoch": epoch, "set": split_name,
                                 "pairwise_dsc": pw, "truth_pairwise_dsc": truth_pw[split_name]})
            finished += 1
            report(finished, total)
    return rows, collapse


def _reconstruct(model: Any, defective: np.ndarray, device: Any, batch: int = 8) -> np.ndarray:
    """Binary reconstructions (bone log-odds > 0, either loss) of a stack of prepared defective skulls (N, S, S, S)."""
    import torch

    from ..nets.autoencoder import bone_logit

    out = []
    with torch.no_grad():
        for i in range(0, len(defective), batch):
            x = torch.as_tensor(defective[i : i + batch], dtype=torch.float32, device=device).unsqueeze(1)
            out.append((bone_logit(model(x)) > 0).squeeze(1).to("cpu", torch.uint8).numpy())
    return np.concatenate(out)


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` wrote: the folder, Table 2 and the differences to the reference as markdown."""

    out: Path
    table_md: str
    reference_md: str
    written: list[str]
    train_s: float
    total_s: float


def run_experiment(
    config: Path,
    out: Path | None = None,
    scale: float | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
    done: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> ExperimentResult:
    """Train the sweep of ``config`` (resumable), evaluate it, write tables, per-case scores and figures into ``out``.

    ``log(message)`` for what happens, ``done(message)`` per finished run, ``progress(done, total)`` while scoring.
    """
    from ..data.synth import write_synthetic
    from ..evaluation.evaluate import rows_to_csv

    log = log or (lambda msg: None)
    exp = load_experiment(config, overrides or [], scale)
    # The figures at the very end need matplotlib: say so now, not after the whole sweep has trained.
    require_extra("skullrec experiment (its figures)", "viewer", ["matplotlib"])
    out = Path(out or exp.out)
    if not Path(exp.data_root).is_dir():
        if exp.synth_if_missing is None:
            raise InputError(f"{exp.data_root}: data set not found (run 'skullrec synth' or 'skullrec prepare' first)")
        log(f"generating the synthetic data set in {exp.data_root} ...")
        write_synthetic(out=Path(exp.data_root), overwrite=False, **{"n_train": 100, "n_eval": 20, "size": 64, "seed": 0, **exp.synth_if_missing})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "experiment.yaml", yaml.safe_dump(_plain(exp), sort_keys=False))
    t0 = time.perf_counter()
    runs = train_sweep(exp, out, device, jobs, done=done)
    t_train = time.perf_counter() - t0
    rows, collapse = evaluate_runs(exp, runs, device, cache_dir=out / "eval", progress=progress)
    ref_rows, ref_collapse = evaluate_references(exp)
    rows, collapse = rows + ref_rows, collapse + ref_collapse
    table = table2(rows, collapse, exp)
    atomic_write_text(out / "per_case.csv", rows_to_csv(rows, columns=()))
    atomic_write_text(out / "collapse.csv", rows_to_csv(collapse, columns=()))
    atomic_write_text(out / "table2.csv", rows_to_csv(table, columns=()))
    md = table2_markdown(table, exp)
    atomic_write_text(out / "table2.md", md)
    written = ["table2.md", "table2.csv", "per_case.csv", "collapse.csv"]
    diffs = versus_reference(rows, exp)
    diffs_md = versus_reference_markdown(diffs, exp) if diffs else ""
    if diffs:
        atomic_write_text(out / "vs_reference.csv", rows_to_csv(diffs, columns=()))
        atomic_write_text(out / "vs_reference.md", diffs_md)
        written += ["vs_reference.md", "vs_reference.csv"]
    fig_paths = figures(exp, runs, rows, out)
    return ExperimentResult(out, md, diffs_md, written + [p.name for p in fig_paths], t_train, time.perf_counter() - t0)


def _plain(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
