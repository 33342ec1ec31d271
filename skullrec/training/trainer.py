"""Training loop, run folder, resume and metrics log behind ``skullrec train``.

A run folder (default ``runs/NAME``) holds::

    config.yaml                  the resolved config
    metrics.jsonl                one JSON record per epoch (see :func:`_epoch_record`)
    ckpt_epoch100.safetensors    model checkpoints at train.checkpoint_epochs (skullrec.nets.checkpoint)
    last.safetensors             the latest epoch
    best.safetensors             best mean validation DSC (best training Dice loss without validation)
    state.pt                     what --resume needs (weights, optimizer, epoch, step, best), weights-only
    .skullrec-train.lock         held (fcntl) by the one trainer writing the folder; a second one is refused

Reproducibility: the initial weights come from ``seed``; epoch ``e``'s shuffle and Hutchinson probes
come from generators seeded by ``(seed, e)`` (skullrec.data.cache.make_generator), and the probe generator's
state is saved with a mid-epoch interruption, so a resumed CPU run ends with exactly the weights of an
uninterrupted one. ``state.pt`` is the commit point of an epoch: it is written last, atomically,
after the checkpoints and the metrics file, so a ``kill -9`` anywhere loses at most the epoch in
progress, which ``--resume`` then recomputes identically.

GPU: the data set lives on the device, the step never calls ``.item()`` (sums stay on the device and
are read once per epoch; the progress bar reads them at most twice a second, and only on a TTY).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, config_from_dict, dump_config, load_config
from ..data.cache import STREAM_MONITOR, STREAM_PROBES, TensorSplit, TrainingData, load_training_data, make_generator
from ..errors import ConfigError, InputError
from ..io import atomic_write_text
from ..nets.checkpoint import architecture, load_training_state, save_checkpoint, save_training_state
from ..utils import resolve_device
from . import distributed

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"
LAST = "last.safetensors"
BEST = "best.safetensors"


# ----------------------------------------------------------------------------------------------
# Run-folder helpers (also used by skullrec.experiment.sweep)


def checkpoint_path(run_dir: str | Path, epoch: int | str) -> Path:
    """The checkpoint of ``epoch`` in a run folder (``ckpt_epoch100.safetensors``); 'last' / 'best' also work."""
    if epoch in ("last", "best"):
        return Path(run_dir) / f"{epoch}.safetensors"
    return Path(run_dir) / f"ckpt_epoch{int(epoch):03d}.safetensors"


def run_finished(run_dir: str | Path) -> bool:
    """True when the run in ``run_dir`` has completed all epochs of its config."""
    run_dir = Path(run_dir)
    try:
        cfg = load_config(run_dir / CONFIG_FILE)
        state = load_training_state(run_dir / STATE_FILE)
    except InputError:
        return False
    return int(state.get("epoch", 0)) >= cfg.train.epochs and int(state.get("step", 0)) == 0




# ----------------------------------------------------------------------------------------------
# One optimisation step


@dataclass
class StepResult:
    """Detached per-step values, still on the device (reading them would sync)."""

    loss: torch.Tensor
    penalty: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    norm_sq: torch.Tensor | None = None


def _amp_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    reg: Any = None,
    lam: float = 0.0,
    sam: bool = False,
    generator: torch.Generator | None = None,
    amp: str = "none",
) -> StepResult:
    """One step: Dice loss (+ lam * FAM penalty when ``reg`` is given), backward, optimizer update.

    ``sam=True`` makes the two-pass SAM/ASAM update (``optimizer`` is a :class:`skullrec.training.sam.SAM`);
    otherwise a plain ``optimizer.step()`` (for a SAM wrapper before ``sam.start_epoch``: its base
    optimizer's step). Never syncs with the host: everything returned stays on the device.
    """
    device = x.device
    optimizer.zero_grad(set_to_none=True)
    with _amp_context(amp, device):
        logits = model(x)
        loss = loss_fn(logits.float(), y)
        total = loss
        out = StepResult(loss=loss.detach())
        if reg is not None:
            term = reg(model, x, y, loss_fn, loss, generator)
            total = loss + lam * term.penalty
            out.penalty = term.penalty.detach()
            out.trace = term.trace.detach()
            out.norm_sq = term.norm_sq.detach()
    total.backward()
    if sam:
        optimizer.first_step()
        optimizer.zero_grad(set_to_none=True)
        with _amp_context(amp, device):
            loss_fn(model(x).float(), y).backward()
        optimizer.second_step()
    else:
        getattr(optimizer, "base_optimizer", optimizer).step()
    return out


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (lr, weight_decay from cfg.train), wrapped in SAM / ASAM for those methods."""
    kw = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.method in ("sam", "asam"):
        from .sam import SAM

        # Method 'asam' is what selects the adaptive variant (config validation refuses sam + adaptive).
        return SAM(model.parameters(), torch.optim.Adam, rho=cfg.sam.rho, adaptive=cfg.train.method == "asam", eta=cfg.sam.eta, **kw)
    return torch.optim.Adam(model.parameters(), **kw)


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    # A SAM wrapper keeps Adam's moments in its base optimizer, which its own state_dict omits.
    state = {"optimizer": opt.state_dict()}
    base = getattr(opt, "base_optimizer", None)
    if base is not None:
        state["base_optimizer"] = base.state_dict()
    return state


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    opt.load_state_dict(state["optimizer"])
    base = getattr(opt, "base_optimizer", None)
    if base is not None and "base_optimizer" in state:
        base.load_state_dict(state["base_optimizer"])
        # load_state_dict replaces base.param_groups with new dicts; SAM shares them with its own.
        opt.param_groups = base.param_groups


# ----------------------------------------------------------------------------------------------
# Evaluation and monitoring


@torch.no_grad()
def evaluate_dsc(model: torch.nn.Module, split: TensorSplit, batch_size: int, amp: str = "none") -> torch.Tensor:
    """Mean DSC (MONAI compute_dice) of ``logits > 0`` against the complete skulls; a 0-d device tensor."""
    from monai.metrics import compute_dice

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=split.defective.device)
    for x, y in split.batches(batch_size):
        with _amp_context(amp, x.device):
            logits = model(x)
        dsc = compute_dice((logits > 0).float(), y, include_background=True)
        total += dsc.to(torch.float64).sum()
    model.train(was_training)
    return total / len(split)


def _layer_norm_sq(model: torch.nn.Module, layers: list[str]) -> torch.Tensor:
    from ..nets.autoencoder import get_linear

    return sum(get_linear(model, name).weight.detach().pow(2).sum() for name in layers)


# ----------------------------------------------------------------------------------------------
# Interruption


class _Interrupt:
    """Turns the first Ctrl-C into a flag checked between steps (the second one interrupts at once).

    Stopping between steps means the saved state is never half an optimizer update.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _torch_settings(cfg: Config, device: torch.device) -> Iterator[None]:
    """Determinism and thread settings for one run, restored afterwards (they are process-wide)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    prev_bench = torch.backends.cudnn.benchmark
    prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.deterministic:
            if device.type == "cuda":
                # cuBLAS needs this before its first use to be deterministic.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only on CUDA: an op without a deterministic kernel should not abort a GPU run.
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        else:
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_cudnn_det


# ----------------------------------------------------------------------------------------------
# The run


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Records of epochs <= ``upto_epoch`` (later ones belong to an epoch the resume will redo)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("epoch", 0)) <= upto_epoch:
            records.append(rec)
    return records


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    # Rewritten whole and atomically (a few hundred short lines): never a torn last line.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class _Progress:
    """A tqdm bar per epoch on a TTY (postfix: loss, kappa-hat, Tr(H)); silent otherwise."""

    def __init__(self, total: int, epoch: int, epochs: int, initial: int, enabled: bool) -> None:
        self.bar = None
        self.last = 0.0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, out: StepResult) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last > 0.5:  # reading the values syncs the device: at most twice a second
            self.last = now
            post = {"loss": f"{out.loss.item():.4f}"}
            if out.trace is not None:
                post["kappa"] = f"{(out.norm_sq * out.trace).item():.3g}"
                post["TrH"] = f"{out.trace.item():.3g}"
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _settle_run_dir(cfg: Config, run_dir: Path, resume: bool, force: bool, overwrite: bool) -> Config:
    """Create / check the run folder; for a resume compare configs. Returns the config to use."""
    cfg_file = run_dir / CONFIG_FILE
    if resume:
        if not cfg_file.is_file():
            raise InputError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); nothing to resume")
        try:
            stored = yaml.safe_load(cfg_file.read_text()) or {}
            old = config_from_dict(stored)
        except (yaml.YAMLError, ConfigError) as exc:
            raise InputError(f"{cfg_file}: unreadable run config ({str(exc).splitlines()[0]})") from None
        diff = _config_diff(old.to_dict(), cfg.to_dict())
        if diff:
            shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in diff[:4]) + (" ..." if len(diff) > 4 else "")
            if not force:
                raise InputError(f"{cfg_file}: the run was started with another config: {shown}; pass --force to resume with the new one")
            if architecture(old) != architecture(cfg):
                raise InputError(f"{cfg_file}: --force cannot change the model architecture of a run ({shown})")
        atomic_write_text(cfg_file, dump_config(cfg))
        return cfg
    if _check_new_run_dir(run_dir, overwrite):
        _clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_file, dump_config(cfg))
    return cfg


LOCK_FILE = ".skullrec-train.lock"


def lock_run_dir(run_dir: Path) -> Any:
    """Take an exclusive lock on a run folder for the life of the returned handle; refuse a second writer.

    Two trainers writing one folder (two ``skullrec experiment`` calls on one results folder, a
    ``--resume`` while the run is still going) would interleave checkpoints and state. The OS lock
    is released when the process ends, even by kill -9, so a stale lock never blocks a resume.
    Returns None where ``fcntl`` is missing (Windows): the run is then unguarded.
    """
    from ..io import exclusive_lock

    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(run_dir / LOCK_FILE, f"{run_dir}: another skullrec train is writing this run folder; wait for it or stop it first")


def _check_new_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Refuse a non-empty folder for a new run unless ``overwrite``; True when it needs clearing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{run_dir}: run folder already holds results; pass --resume {run_dir} to continue it or --overwrite to start again")
        return True
    return False


def _clear_run_dir(run_dir: Path) -> None:
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
    for p in run_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "__pycache__", ignore_errors=True)


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    data: TrainingData | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (already prepared: config.yaml written); returns the last metrics record.

    ``resume`` continues from ``state.pt`` when there is one; training data other than the run's are
    refused unless ``force``. ``data`` may be given to skip loading.
    Ctrl-C saves the state between two steps and raises KeyboardInterrupt.
    """
    from monai.losses import DiceLoss

    from ..nets.autoencoder import build_model

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    dinfo = distributed.current()  # a torchrun (DDP) job, or a single process (skullrec.training.distributed)
    log = log or (lambda s: None)
    if progress is None:
        progress = sys.stderr.isatty()
    if not dinfo.is_main:  # only rank 0 prints and writes the run folder; the ranks hold identical weights
        log, progress = (lambda s: None), False
    save_checkpoint_, save_state_, write_metrics_ = (distributed.main_only(f) for f in (save_checkpoint, save_training_state, _write_metrics))

    with _torch_settings(cfg, dev):
        if data is None:
            data = load_training_data(cfg.data, cfg.model.size, dev)
        model = build_model(cfg.model, seed=cfg.seed).to(dev)
        model.train()
        optimizer = make_optimizer(cfg, model)
        loss_fn = DiceLoss(sigmoid=True)
        from ..flatness.regularizer import FamRegularizer

        # Built for every method: FAM trains with it, the others only log Tr(H) and kappa-hat with it.
        reg = FamRegularizer(cfg.fam, model)
        method = cfg.train.method

        start_epoch, start_step = 1, 0
        best_score, best_epoch = None, None
        resumed: dict[str, Any] | None = None
        state_path = run_dir / STATE_FILE
        if resume and state_path.is_file():
            resumed = load_training_state(state_path, map_location=dev)
            if resumed.get("data") not in (None, data.train.fingerprint) and not force:
                raise InputError(
                    f"{cfg.data.root}/{cfg.data.train_split}: the training data differ from those the run in {run_dir} "
                    "was trained on; pass --force to resume anyway"
                )
            model.load_state_dict(resumed["model"])
            _load_optimizer_state(optimizer, resumed["optimizer"])
            start_epoch = int(resumed["epoch"]) + 1 if int(resumed["step"]) == 0 else int(resumed["epoch"])
            start_step = int(resumed["step"])
            best_score, best_epoch = resumed.get("best_score"), resumed.get("best_epoch")
            log(f"resuming {run_dir} at epoch {start_epoch}" + (f" step {start_step}" if start_step else ""))
        completed = start_epoch - 1
        records = _read_metrics(run_dir / METRICS_FILE, completed)
        if not resume or resumed is None:
            records = []

        n_train = len(data.train)
        steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
        last_record: dict[str, Any] = records[-1] if records else {}
        distributed.check_batch_size(cfg.train.batch_size, dinfo)
        net = distributed.wrap(model, dinfo, dev)  # DDP when distributed; `model` stays the plain module
        interrupt = _Interrupt()
        with interrupt:
            for epoch in range(start_epoch, cfg.train.epochs + 1):
                batches = data.epoch_order(cfg.seed, epoch, cfg.train.batch_size)
                probes = make_generator(dev, cfg.seed, epoch, STREAM_PROBES)
                zero = torch.zeros((), dtype=torch.float64, device=dev)
                sums = {"loss": zero.clone(), "penalty": zero.clone(), "trace": zero.clone(), "norm_sq": zero.clone()}
                reg_steps, elapsed, first = 0, 0.0, 0
                if resumed is not None and epoch == start_epoch and start_step > 0:
                    sums = {k: v.to(dev) for k, v in resumed["sums"].items()}
                    reg_steps, elapsed, first = int(resumed["reg_steps"]), float(resumed["elapsed"]), start_step
                    probes.set_state(resumed["probes"].cpu())  # a generator state is a CPU tensor, even for CUDA
                use_sam = method in ("sam", "asam") and epoch >= cfg.sam.start_epoch
                bar = _Progress(steps_per_epoch, epoch, cfg.train.epochs, first, progress)
                t0 = time.perf_counter()
                for i in range(first, steps_per_epoch):
                    x, y = data.train.batch(distributed.shard(batches[i], dinfo))
                    global_step = (epoch - 1) * steps_per_epoch + i
                    use_reg = method == "fam" and global_step % cfg.fam.every == 0
                    out = train_step(
                        net, x, y, loss_fn, optimizer,
                        reg=reg if use_reg else None, lam=cfg.fam.lam, sam=use_sam, generator=probes, amp=cfg.train.amp,
                    )
                    n = x.shape[0]
                    sums["loss"] += out.loss.to(torch.float64) * n
                    if out.penalty is not None:
                        sums["penalty"] += out.penalty.to(torch.float64)
                        sums["trace"] += out.trace.to(torch.float64)
                        sums["norm_sq"] += out.norm_sq.to(torch.float64)
                        reg_steps += 1
                    bar.update(out)
                    if interrupt.requested:
                        bar.close()
                        step_done = i + 1
                        if step_done == steps_per_epoch:
                            break  # finish the epoch normally; the check after it stops the run
                        save_state_(state_path, {
                            "model": model.state_dict(), "optimizer": _optimizer_state(optimizer),
                            "epoch": epoch, "step": step_done, "sums": sums, "reg_steps": reg_steps,
                            "elapsed": elapsed + time.perf_counter() - t0, "probes": probes.get_state(),
                            "best_score": best_score, "best_epoch": best_epoch, "data": data.train.fingerprint,
                        })
                        raise _interrupted(run_dir, epoch, step_done)
                bar.close()

                # ---- end of epoch: one sync, validation, checkpoints, metrics, then the state (commit)
                summary = {k: float(v) for k, v in zip(sums, distributed.epoch_sums(torch.stack(list(sums.values())), dinfo).tolist())}
                seconds = elapsed + time.perf_counter() - t0
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "method": method,
                    "dice_loss": summary["loss"] / n_train,
                    "reg_steps": reg_steps,
                    "regularizer": summary["penalty"] / reg_steps if reg_steps else None,
                    "trace": summary["trace"] / reg_steps if reg_steps else None,
                    "norm_sq": float(_layer_norm_sq(model, cfg.fam.layers)),
                    "sam": use_sam,
                    "seconds": seconds,
                }
                if record["trace"] is not None:
                    record["kappa_hat"] = summary["norm_sq"] / reg_steps * record["trace"]
                validate = cfg.train.val_every > 0 and (epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs)
                if validate and data.evals:
                    val = {name: evaluate_dsc(model, split, 2 * cfg.train.batch_size, cfg.train.amp) for name, split in data.evals.items()}
                    record["val_dsc"] = dict(zip(val, torch.stack(list(val.values())).tolist()))
                    record["val_dsc_mean"] = sum(record["val_dsc"].values()) / len(val)
                if validate and reg is not None and method != "fam":
                    record.update(_monitor(model, data.train, cfg, reg, loss_fn, epoch, dev))
                score, by = (record["val_dsc_mean"], "val_dsc_mean") if "val_dsc_mean" in record else (-record["dice_loss"], "train_dice_loss")
                meta = {"epoch": epoch, "method": method, "dice_loss": record["dice_loss"], "val_dsc": record.get("val_dsc")}
                if epoch in cfg.train.checkpoint_epochs:
                    save_checkpoint_(checkpoint_path(run_dir, epoch), model, cfg, **meta)
                if best_score is None or score > best_score:
                    best_score, best_epoch = score, epoch
                    save_checkpoint_(run_dir / BEST, model, cfg, best_by=by, **meta)
                save_checkpoint_(run_dir / LAST, model, cfg, **meta)
                record["best_epoch"] = best_epoch
                records.append(record)
                write_metrics_(run_dir / METRICS_FILE, records)
                save_state_(state_path, {
                    "model": model.state_dict(), "optimizer": _optimizer_state(optimizer),
                    "epoch": epoch, "step": 0, "best_score": best_score, "best_epoch": best_epoch,
                    "data": data.train.fingerprint,
                })
                log(_summary_line(record, cfg.train.epochs))
                last_record = record
                if interrupt.requested:
                    if epoch < cfg.train.epochs:
                        raise _interrupted(run_dir, epoch + 1, 0)
                    break
                resumed = None
    return last_record


def _interrupted(run_dir: Path, epoch: int, step: int) -> KeyboardInterrupt:
    """The KeyboardInterrupt a stopped run raises; its message (printed by the CLI) says how to continue."""
    where = f"epoch {epoch} step {step}" if step else f"the start of epoch {epoch}"
    return KeyboardInterrupt(
        f"interrupted: state saved in {run_dir / STATE_FILE}; continue from {where} with: skullrec train --resume {run_dir}"
    )


def _monitor(model, split: TensorSplit, cfg: Config, reg: Any, loss_fn, epoch: int, dev: torch.device) -> dict[str, float]:
    """Tr(H) and kappa-hat of the FAM layers on the first training batch (methods that do not compute them)."""
    x, y = split.batch(torch.arange(min(cfg.train.batch_size, len(split)), device=split.defective.device))
    gen = make_generator(dev, cfg.seed, epoch, STREAM_MONITOR)
    loss = loss_fn(model(x), y)
    term = reg(model, x, y, loss_fn, loss, gen)
    trace, norm_sq = float(term.trace.detach()), float(term.norm_sq.detach())
    model.zero_grad(set_to_none=True)
    return {"monitor_trace": trace, "monitor_kappa_hat": trace * norm_sq}


def _summary_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {_fmt(r['dice_loss'])}"]
    if r.get("trace") is not None:
        parts += [f"reg {_fmt(r['regularizer'], '.3g')}", f"TrH {_fmt(r['trace'], '.3g')}", f"kappa {_fmt(r.get('kappa_hat'), '.3g')}"]
    elif r.get("monitor_trace") is not None:
        parts += [f"TrH {_fmt(r['monitor_trace'], '.3g')}", f"kappa {_fmt(r['monitor_kappa_hat'], '.3g')}"]
    parts.append(f"|w|^2 {_fmt(r['norm_sq'], '.4g')}")
    for name, v in (r.get("val_dsc") or {}).items():
        parts.append(f"DSC {name} {_fmt(v)}")
    parts.append(f"{r['seconds']:.1f} s")
    return "  ".join(parts)


def run_training(
    config: Path,
    overrides: list[str],
    run_dir: Path | None = None,
    resume: Path | None = None,
    force: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Load and check the config, settle the run folder (``resume`` or ``run_dir`` or runs/NAME), train; returns the folder.

    Under torchrun (WORLD_SIZE > 1) the process joins the process group and trains on cuda:LOCAL_RANK.
    """
    log = log or (lambda s: None)
    cfg = load_config(config, overrides)
    dinfo, dev = distributed.setup(resolve_device(device))
    lock = None
    folder = Path(resume) if resume is not None else Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    try:
        distributed.check_batch_size(cfg.train.batch_size, dinfo)
        if resume is None and dinfo.is_main:
            _check_new_run_dir(folder, overwrite)
        # Data problems (missing split, wrong size) are reported before the run folder is touched.
        data = load_training_data(cfg.data, cfg.model.size, dev)
        if dinfo.is_main:  # one writer, holding the folder until it exits; if it fails, torchrun stops the other ranks
            lock = lock_run_dir(folder)
            cfg = _settle_run_dir(cfg, folder, resume=resume is not None, force=force, overwrite=overwrite)
        distributed.barrier(dinfo)
        if resume is not None and run_finished(folder):
            if dinfo.is_main:
                log(f"{folder}: already finished ({cfg.train.epochs} epochs); nothing to do")
            return folder
        if dinfo.is_main:
            ranks = f" x {dinfo.world_size} processes ({dinfo.backend})" if dinfo.enabled else ""
            log(f"training {cfg.name} ({cfg.train.method}) on {dev}{ranks} -> {folder}")
        train(cfg, folder, device=dev, resume=resume is not None, data=data, force=force, log=log)
        # Leave together: a rank that tears down while rank 0 still writes the last checkpoints can see
        # its gloo connections closed under it and abort (seen once in CI as SIGABRT on rank 1).
        distributed.barrier(dinfo)
    finally:
        distributed.teardown()
        if lock is not None:
            lock.close()
    return folder


__all__ = [
    "checkpoint_path",
    "run_finished",
    "StepResult",
    "train_step",
    "make_optimizer",
    "evaluate_dsc",
    "train",
    "run_training",
]
