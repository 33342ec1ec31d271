"""The run folder of ``skullrec train`` and the results folder of ``skullrec experiment``: every file name in one place.

A run folder (default ``runs/NAME``) holds::

    config.yaml                  the resolved config
    metrics.jsonl                one JSON record per epoch
    ckpt_epoch100.safetensors    model checkpoints at train.checkpoint_epochs (skullrec.nets.checkpoint)
    last.safetensors             the latest epoch
    best.safetensors             best mean validation DSC (best training Dice loss without validation)
    state.pt                     what --resume needs (weights, optimizer, epoch, step, best), weights-only
    .skullrec-train.lock         held (fcntl) by the one trainer writing the folder; a second one is refused

An experiment's results folder holds ``configs/NAME_seedS.yaml`` (each run's config), ``runs/NAME_seedS/``
(its run folder) and ``runs/NAME_seedS.log`` (the trainer's output), next to the tables and figures.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from ..config import Config, dump_config, load_stored_config
from ..errors import ConfigError, InputError, short_repr
from ..io import atomic_write_text
from ..nets.checkpoint import architecture, load_training_state

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"
LAST = "last.safetensors"
BEST = "best.safetensors"
LOCK_FILE = ".skullrec-train.lock"
SWEEP_RUNS = "runs"  # an experiment's run folders and trainer logs
SWEEP_CONFIGS = "configs"  # an experiment's per-run configs

# Temporary files of the run's atomic writes (skullrec.io: ``.NAME.XXXXXXXX.SUFFIX`` beside NAME, or
# ``.tmp`` for a name without suffix). A process killed mid-write (kill -9, ulimit -f, power loss) leaves
# one behind; nothing else in a run folder has these names.
_TEMPORARY = re.compile(r"^\.(?:(?:config\.yaml|metrics\.jsonl|state\.pt|last\.safetensors|best\.safetensors"
                        r"|ckpt_epoch\d+\.safetensors)\..+|.+\.tmp)$")

log = logging.getLogger("skullrec")


def checkpoint_path(run_dir: str | Path, epoch: int | str) -> Path:
    """The checkpoint of ``epoch`` in a run folder (``ckpt_epoch100.safetensors``); 'last' / 'best' also work."""
    if epoch in ("last", "best"):
        return Path(run_dir) / f"{epoch}.safetensors"
    return Path(run_dir) / f"ckpt_epoch{int(epoch):03d}.safetensors"


def run_finished(run_dir: str | Path) -> bool:
    """True when the run in ``run_dir`` has completed all epochs of its config."""
    run_dir = Path(run_dir)
    try:
        cfg = load_stored_config(run_dir / CONFIG_FILE)
        state = load_training_state(run_dir / STATE_FILE)
    except InputError:
        return False
    return int(state.get("epoch", 0)) >= cfg.train.epochs and int(state.get("step", 0)) == 0


def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in epoch order; only epochs <= ``upto_epoch`` when given.

    Later epochs belong to an epoch a resume will redo; unreadable lines (a torn write) are skipped.
    """
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (upto_epoch is None or int(rec.get("epoch", 0)) <= upto_epoch):
            records.append(rec)
    return sorted(records, key=lambda r: r.get("epoch", 0))


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole and atomically (a few hundred short lines): never a torn last line."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def lock_run_dir(run_dir: Path) -> Any:
    """Take an exclusive lock on a run folder for the life of the returned handle; refuse a second writer.

    Two trainers writing one folder (two ``skullrec experiment`` calls on one results folder, a
    ``--resume`` while the run is still going) would interleave checkpoints and state. The OS lock
    is released when the process ends, even by kill -9, so a stale lock never blocks a resume.
    Returns None where ``fcntl`` is missing (Windows): the run is then unguarded.
    """
    from ..io import exclusive_lock  # the one lock helper (also guards staged output folders)

    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(run_dir / LOCK_FILE, f"{run_dir}: another skullrec train is writing this run folder; wait for it or stop it first")


def stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Temporary files a killed write left in a run folder (``.state.pt.x7f3a.pt``, ``.metrics.jsonl.*``, ``.*.tmp``, ...)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _TEMPORARY.match(p.name) and p.is_file())


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Remove :func:`stale_temporaries` with one warning each; call it holding the run folder's lock.

    Only under the lock: a live trainer's temporary file is about to become a checkpoint.
    """
    for p in stale_temporaries(run_dir):
        p.unlink(missing_ok=True)
        log.warning(f"warning: {p}: removed a partly written file of an earlier run that was interrupted")


def check_new_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Refuse a non-empty folder for a new run unless ``overwrite``; True when it needs clearing.

    Torn temporary files alone (:func:`stale_temporaries`) are not results: such a folder is new.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a folder")
    torn = set(stale_temporaries(run_dir))
    if run_dir.is_dir() and any(p.name != LOCK_FILE and p not in torn for p in run_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{run_dir}: run folder already holds results; pass --resume {run_dir} to continue it or --overwrite to start again")
        return True
    return False


def clear_run_dir(run_dir: Path) -> None:
    """Remove what a run writes (and nothing else: --run-dir may point at a folder with other files)."""
    for p in run_dir.iterdir():
        is_ours = p.name in (CONFIG_FILE, METRICS_FILE, STATE_FILE, LAST, BEST) or (
            p.name.startswith("ckpt_epoch") and p.name.endswith(".safetensors")
        )
        if is_ours and p.is_file():
            p.unlink()
    # Leftover temporary files of interrupted atomic writes.
    for p in run_dir.glob(".*.safetensors"):
        p.unlink(missing_ok=True)
    for p in stale_temporaries(run_dir):
        p.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "__pycache__", ignore_errors=True)


def settle_run_dir(cfg: Config, run_dir: Path, resume: bool, force: bool, overwrite: bool) -> Config:
    """Create / check the run folder; for a resume compare configs. Returns the config to use.

    Call it holding the folder's lock (:func:`lock_run_dir`): temporary files torn by an interrupted
    earlier run are removed here, with a warning.
    """
    cfg_file = run_dir / CONFIG_FILE
    remove_stale_temporaries(run_dir)
    if resume:
        if not cfg_file.is_file():
            raise InputError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); nothing to resume")
        try:
            old = load_stored_config(cfg_file)
        except ConfigError as exc:
            reason = str(exc).splitlines()[0].removeprefix(f"{cfg_file}: ")
            raise InputError(f"{cfg_file}: unreadable run config ({reason})") from None
        check_resume(run_dir, old, cfg, force)
        atomic_write_text(cfg_file, dump_config(cfg))
        return cfg
    if check_new_run_dir(run_dir, overwrite):
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_file, dump_config(cfg))
    return cfg


def describe_diff(diff: list[tuple[str, Any, Any]]) -> str:
    """The first differing keys of :func:`config_diff`, each with its old and new value (bounded)."""
    return ", ".join(f"{k} ({short_repr(a, 40)} -> {short_repr(b, 40)})" for k, a, b in diff[:4]) + (" ..." if len(diff) > 4 else "")


def check_resume(run_dir: Path, stored: Config, cfg: Config, force: bool) -> None:
    """Refuse to resume ``run_dir`` with ``cfg`` where it differs from what the run holds, in one line naming the key.

    What the run holds is, in order of trust: the config saved inside ``state.pt`` (the one its weights and
    optimizer were trained with), else the architecture of ``last.safetensors``, else ``config.yaml``
    (``stored``). So editing config.yaml itself, which ``--resume RUN`` then reads, is noticed too. Another
    config needs ``--force``; another architecture is refused even then, and so is a ``state.pt`` whose
    weights do not fit ``cfg``'s architecture (compared by shape, nothing built).
    """
    from ..config import config_from_dict, upgrade_stored
    from ..nets.autoencoder import state_shapes
    from ..nets.checkpoint import read_checkpoint_config

    cfg_file, state_file = run_dir / CONFIG_FILE, run_dir / STATE_FILE
    state = load_training_state(state_file) if state_file.is_file() else None
    held, where, arch_ref = stored, "run was started", stored
    if state is not None and isinstance(state.get("config"), dict):
        try:
            held = config_from_dict(upgrade_stored(state["config"]))
        except ConfigError as exc:
            raise InputError(f"{state_file}: its saved config is invalid for this skullrec version ({exc})") from None
        where, arch_ref = f"run's saved state ({STATE_FILE}) was trained", held
    elif (run_dir / LAST).is_file():
        arch_ref = read_checkpoint_config(run_dir / LAST)
    diff = config_diff(held.to_dict(), cfg.to_dict())
    if diff and not force:
        raise InputError(f"{cfg_file}: the {where} with another config: {describe_diff(diff)}; pass --force to resume with the new one")
    if architecture(arch_ref) != architecture(cfg):
        model_diff = [d for d in config_diff(arch_ref.to_dict(), cfg.to_dict()) if d[0].startswith("model.")]
        raise InputError(f"{cfg_file}: --force cannot change the model architecture of a run ({describe_diff(model_diff)}); "
                         "restore the config or start a new run")
    if state is not None:
        check_state_weights(state, state_shapes(cfg.model), state_file, f"the model architecture of {cfg_file}")


def check_state_weights(state: dict[str, Any], expected: dict[str, tuple[int, ...]], state_file: Path, what: str) -> None:
    """Refuse a training state whose saved weights do not have the ``expected`` shapes (``what`` names the architecture)."""
    from ..nets.checkpoint import shape_problem

    weights = state.get("model")
    if not isinstance(weights, dict) or not all(hasattr(t, "shape") for t in weights.values()):
        raise InputError(f"{state_file}: not a skullrec training state (no model weights)")
    problem = shape_problem({k: tuple(t.shape) for k, t in weights.items()}, expected)
    if problem:
        raise InputError(f"{state_file}: the saved weights do not fit {what} ({problem}); restore the config or start a new run")


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf where two config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


# ----------------------------------------------------------------------------------------------
# the results folder of an experiment


def sweep_run_dir(out: Path, name: str, seed: int) -> Path:
    """The run folder of method ``name``, seed ``seed`` in an experiment's results folder."""
    return Path(out) / SWEEP_RUNS / f"{name}_seed{seed}"


def sweep_log(out: Path, name: str, seed: int) -> Path:
    """Where the experiment keeps that run's trainer output."""
    return Path(out) / SWEEP_RUNS / f"{name}_seed{seed}.log"


def sweep_config(out: Path, name: str, seed: int) -> Path:
    """Where the experiment writes that run's resolved config."""
    return Path(out) / SWEEP_CONFIGS / f"{name}_seed{seed}.yaml"
