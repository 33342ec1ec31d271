"""The training loop behind ``skullrec train``: a short loop over named steps, resume and the metrics log.

:func:`train` is ``_start`` (data, model, optimizer, regulariser, resumed state) and, per epoch,
``_train_epoch`` (the steps) -> ``_epoch_record`` -> ``_validate`` -> ``_save_epoch`` (checkpoints, metrics,
state). The run folder's files are named in :mod:`skullrec.training.run_dir`.

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
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import FAM_METHODS, Config, load_config, load_stored_config
from ..data.cache import STREAM_MONITOR, STREAM_PROBES, TensorSplit, TrainingData, load_training_data, make_generator
from ..errors import ConfigError, InputError
from ..guards import check_outside_inputs
from ..nets.checkpoint import load_training_state, save_checkpoint, save_training_state
from ..utils import resolve_device
from . import distributed, speed
from .lookbehind import Lookbehind
from .run_dir import (
    BEST,
    CONFIG_FILE,
    LAST,
    METRICS_FILE,
    STATE_FILE,
    check_new_run_dir,
    checkpoint_path,
    lock_run_dir,
    read_metrics,
    run_finished,
    settle_run_dir,
    write_metrics,
)

# ----------------------------------------------------------------------------------------------
# One optimisation step


@dataclass
class StepResult:
    """Detached per-step values, still on the device (reading them would sync)."""

    loss: torch.Tensor
    penalty: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    norm_sq: torch.Tensor | None = None


def amp_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for ``amp`` ("bf16", or "auto" resolved per device by speed.resolve_amp); a no-op for "none"."""
    # "auto" resolves per device (speed.resolve_amp), so every caller passing cfg.train.amp agrees.
    return speed.amp_context(speed.resolve_amp(amp, device), device)




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
    loss_scale: float = 1.0,
    penalty_scale: float = 1.0,
) -> StepResult:
    """One step: Dice loss (+ lam * FAM penalty when ``reg`` is given), backward, optimizer update.

    ``sam=True`` makes the two-pass SAM/ASAM update (``optimizer`` is a :class:`skullrec.training.sam.SAM`),
    or the k + 1-pass Lookbehind-SAM update (a :class:`skullrec.training.lookbehind.Lookbehind`);
    otherwise a plain ``optimizer.step()`` (for a SAM wrapper before ``sam.start_epoch``: its base
    optimizer's step). Never syncs with the host: everything returned stays on the device.
    The objective is ``loss_scale * loss + lam * penalty_scale * penalty`` (method fam_authors: the
    authors' 80 * sum-reduced Dice loss and the trace of the sum, see :func:`objective_scales`);
    ``StepResult.loss`` is always the unscaled (mean) Dice loss.
    """
    device = x.device
    optimizer.zero_grad(set_to_none=True)
    with amp_context(amp, device):
        logits = model(x)
        loss = loss_fn(logits.float(), y)
        total = loss * loss_scale if loss_scale != 1.0 else loss
        out = StepResult(loss=loss.detach())
        if reg is not None:
            term = reg(model, x, y, loss_fn, loss, generator)
            total = total + (lam * penalty_scale) * term.penalty
            out.penalty = term.penalty.detach()
            out.trace = term.trace.detach()
            out.norm_sq = term.norm_sq.detach()
    total.backward()
    if sam:  # SAM / ASAM / Lookbehind-SAM: the wrapper's step re-evaluates the loss at its perturbed weights
        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with amp_context(amp, device):
                inner = loss_fn(model(x).float(), y)
            inner.backward()
            return inner

        optimizer.step(closure)
    else:
        getattr(optimizer, "base_optimizer", optimizer).step()
    return out


def objective_scales(cfg: Config, batch: int) -> tuple[float, float]:
    """(loss_scale, penalty_scale) of the training objective for a batch of ``batch`` samples.

    1, 1 for every method but fam_authors. fam_authors trains the authors' objective
    ``80 * DiceLoss_sum + lam * ||W||_F * Tr(H[DiceLoss_sum])``: MONAI's "sum" reduction adds the
    per-sample, per-channel Dice losses, i.e. batch * C times the mean loss (C = 2 channels), and the
    Hessian of that sum is batch * C times the mean's. Computing it from the mean loss keeps the fast,
    unbiased estimators (they need a mean of per-sample losses) and the logged values comparable.
    """
    if cfg.train.method != "fam_authors":
        return 1.0, 1.0
    from ..config import AUTHORS_LOSS_SCALE
    from ..nets.autoencoder import out_channels

    n_sum = float(batch * out_channels(cfg.model.loss))
    return AUTHORS_LOSS_SCALE * n_sum, n_sum
# Methods whose step is a SAM-like update (from sam.start_epoch on; plain base-optimizer steps before).
SAM_LIKE = ("sam", "asam", "lookbehind")


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (lr, weight_decay from cfg.train), wrapped in SAM / ASAM / Lookbehind for those methods."""
    kw = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.method in ("sam", "asam"):
        from .sam import SAM

        # Method 'asam' is what selects the adaptive variant (config validation refuses sam + adaptive).
        return SAM(model.parameters(), torch.optim.Adam, rho=cfg.sam.rho, adaptive=cfg.train.method == "asam", eta=cfg.sam.eta, **kw)
    if cfg.train.method == "lookbehind":
        lb = cfg.lookbehind
        return Lookbehind(model.parameters(), torch.optim.Adam, rho=lb.rho, k=lb.k, alpha=lb.alpha, **kw)
    return torch.optim.Adam(model.parameters(), **kw)


# ----------------------------------------------------------------------------------------------
# Evaluation and monitoring


@torch.no_grad()
def evaluate_dsc(model: torch.nn.Module, split: TensorSplit, batch_size: int) -> torch.Tensor:
    """Mean DSC (MONAI compute_dice) of the predicted bone (bone log-odds > 0) against the complete skulls; a 0-d device tensor."""
    from monai.metrics import compute_dice

    from ..nets.autoencoder import bone_logit

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=split.defective.device)
    for x, y in split.batches(batch_size):
        logits = model(x)  # float32 whatever train.amp: the DSC predict would give
        dsc = compute_dice((bone_logit(logits) > 0).float(), y, include_background=True)
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


@dataclass
class _Run:
    """What the steps of one training run share: config, folder, device, data, model, optimizer, progress so far."""

    cfg: Config
    run_dir: Path | None  # None: a loop without a run folder (a federated site's local epochs)
    dev: torch.device
    dinfo: distributed.DistInfo
    data: TrainingData
    model: torch.nn.Module  # the plain module (checkpoints, evaluation)
    net: torch.nn.Module  # what the step trains: the DDP wrapper when distributed
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reg: Any
    log: Callable[[str], None]
    progress: bool
    steps_per_epoch: int
    amp: str = "none"  # train.amp as run (speed.resolve_amp)
    compiled: bool = False  # whether net is the torch.compile'd step (speed.prepare)
    start_epoch: int = 1
    start_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    resumed: dict[str, Any] | None = None  # the mid-epoch state to continue from (first epoch only)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        assert self.run_dir is not None, "a run without a folder has no state file"
        return self.run_dir / STATE_FILE

    def save_state(self, epoch: int, step: int, **mid_epoch: Any) -> None:
        """Write state.pt (rank 0): the commit point of an epoch, or of an interrupted step with its sums."""
        if self.dinfo.is_main:
            save_training_state(self.state_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step": step,
                "best_score": self.best_score, "best_epoch": self.best_epoch, "data": self.data.train.fingerprint,
                "config": self.cfg.to_dict(),  # what the weights were trained with: --resume compares config.yaml with it
                **mid_epoch,
            })


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
    refused unless ``force``. ``data`` may be given to skip loading. ``log(line)`` gets one line per
    epoch. Ctrl-C saves the state between two steps and raises KeyboardInterrupt.
    """
    dev = resolve_device(device)
    with _torch_settings(cfg, dev):
        run = _start(cfg, Path(run_dir), dev, resume, progress, log, data, force)
        with _Interrupt() as interrupt:
            for epoch in range(run.start_epoch, cfg.train.epochs + 1):
                sums, reg_steps, seconds = _train_epoch(run, epoch, interrupt)
                record = _epoch_record(run, epoch, sums, reg_steps, seconds)
                _validate(run, epoch, record)
                _save_epoch(run, epoch, record)
                run.log(_summary_line(record, cfg.train.epochs))
                run.resumed = None
                if interrupt.requested:
                    if epoch < cfg.train.epochs:
                        raise _interrupted(run.run_dir, epoch + 1, 0)
                    break
    return run.records[-1] if run.records else {}


def make_run(
    cfg: Config, data: TrainingData, dev: torch.device, *, model: torch.nn.Module | None = None,
    run_dir: Path | None = None, log: Callable[[str], None] | None = None, progress: bool = False,
) -> _Run:
    """The model (``model``, else seeded from ``cfg.seed``), optimizer, loss and regulariser of a training loop over ``data``.

    What ``skullrec train`` and a federated site's local update share: both then run
    :func:`_train_epoch` / :func:`_epoch_record` over global epoch numbers, so the batch order, the
    Hutchinson probes, ``sam.start_epoch`` and the ``fam.every`` schedule follow one rule everywhere.
    ``run_dir`` is None for a loop without a run folder (a federated site: nothing is saved locally)."""
    from ..flatness.regularizer import FamRegularizer
    from ..nets.autoencoder import build_model, loss_function

    dinfo = distributed.current()  # a torchrun (DDP) job, or a single process (skullrec.training.distributed)
    model = (build_model(cfg.model, seed=cfg.seed) if model is None else model).to(dev)
    model.train()
    distributed.check_batch_size(cfg.train.batch_size, dinfo)
    return _Run(
        cfg=cfg, run_dir=run_dir, dev=dev, dinfo=dinfo, data=data, model=model, net=model,
        optimizer=make_optimizer(cfg, model), loss_fn=loss_function(cfg.model.loss),
        # Built for every method (FAM trains with it; the others' monitoring builds its whole-batch twin);
        # it refuses a biased estimator / trace-mode / world-size combination before any training.
        reg=FamRegularizer(cfg.fam, model, dinfo.world_size), log=log or (lambda s: None), progress=progress,
        steps_per_epoch=math.ceil(len(data.train) / cfg.train.batch_size),
        amp=speed.resolve_amp(cfg.train.amp, dev),  # train.compile is applied by _start (skullrec train) only
    )


def _start(
    cfg: Config, run_dir: Path, dev: torch.device, resume: bool, progress: bool | None, log: Callable[[str], None] | None,
    data: TrainingData | None, force: bool,
) -> _Run:
    """Load the data, build model, optimizer and regulariser (:func:`make_run`), and restore ``state.pt`` when resuming."""
    dinfo = distributed.current()
    log = log or (lambda s: None)
    if progress is None:
        progress = sys.stderr.isatty()
    if not dinfo.is_main:  # only rank 0 reports and writes the run folder; the ranks hold identical weights
        log, progress = (lambda s: None), False
    if data is None:
        data = load_training_data(cfg.data, cfg.model.size, dev)
    run = make_run(cfg, data, dev, run_dir=run_dir, log=log, progress=progress)
    model = run.model
    if resume and run.state_path.is_file():
        state = load_training_state(run.state_path, map_location=dev)
        if state.get("data") not in (None, data.train.fingerprint) and not force:
            raise InputError(
                f"{cfg.data.root}/{cfg.data.train_split}: the training data differ from those the run in {run_dir} "
                "was trained on; pass --force to resume anyway"
            )
        model.load_state_dict(state["model"])
        opt_state = state["optimizer"]
        # Older state.pt files nest it as {"optimizer": ..., "base_optimizer": ...} (the same dict twice for SAM).
        run.optimizer.load_state_dict(opt_state if "param_groups" in opt_state else opt_state["optimizer"])
        run.start_step = int(state["step"])
        run.start_epoch = int(state["epoch"]) + 1 if run.start_step == 0 else int(state["epoch"])
        run.best_score, run.best_epoch = state.get("best_score"), state.get("best_epoch")
        run.records = read_metrics(run_dir / METRICS_FILE, run.start_epoch - 1)
        run.resumed = state
        log(f"resuming {run_dir} at epoch {run.start_epoch}" + (f" step {run.start_step}" if run.start_step else ""))
    run.net = distributed.wrap(model, dinfo, dev)  # DDP when distributed; run.model stays the plain module
    total_steps = run.steps_per_epoch * cfg.train.epochs
    twice = speed.needs_double_backward(cfg)
    if cfg.train.compile is True and twice:
        log(f"train.compile: not applied: the step differentiates twice (fam.estimator={cfg.fam.estimator}), "
            "which a compiled backward cannot; training eagerly")
    if speed.resolve_compile(cfg.train.compile, dev, total_steps, dinfo.enabled, twice):
        # The trial batch has the steps' shape (static shapes: a smaller last batch compiles once more).
        example = data.train.batch(distributed.shard(torch.arange(min(cfg.train.batch_size, len(data.train)), device=dev), dinfo))
        run.net, run.compiled = speed.prepare(run.net, True, run.amp, example, run.loss_fn, warn=log)
    log(f"step: {speed.describe(run.amp, run.compiled)} (train.amp={cfg.train.amp}, train.compile={cfg.train.compile})")
    return run


def _train_epoch(run: _Run, epoch: int, interrupt: _Interrupt | None = None) -> tuple[dict[str, torch.Tensor], int, float]:
    """The steps of one epoch: (device sums of loss, penalty, trace, norm_sq; regularised steps; seconds).

    A requested interrupt saves the mid-epoch state and raises KeyboardInterrupt (none without a run folder).
    """
    cfg, dev, method = run.cfg, run.dev, run.cfg.train.method
    batches = run.data.epoch_order(cfg.seed, epoch, cfg.train.batch_size)
    probes = make_generator(dev, cfg.seed, epoch, STREAM_PROBES)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    sums = {"loss": zero.clone(), "penalty": zero.clone(), "trace": zero.clone(), "norm_sq": zero.clone()}
    reg_steps, elapsed, first = 0, 0.0, 0
    if run.resumed is not None and run.start_step > 0:
        sums = {k: v.to(dev) for k, v in run.resumed["sums"].items()}
        reg_steps, elapsed, first = int(run.resumed["reg_steps"]), float(run.resumed["elapsed"]), run.start_step
        probes.set_state(run.resumed["probes"].cpu())  # a generator state is a CPU tensor, even for CUDA
    use_sam = method in SAM_LIKE and epoch >= cfg.sam.start_epoch
    bar = _Progress(run.steps_per_epoch, epoch, cfg.train.epochs, first, run.progress)
    t0 = time.perf_counter()
    for i in range(first, run.steps_per_epoch):
        x, y = run.data.train.batch(distributed.shard(batches[i], run.dinfo))
        use_reg = method in FAM_METHODS and ((epoch - 1) * run.steps_per_epoch + i) % cfg.fam.every == 0
        loss_scale, penalty_scale = objective_scales(cfg, x.shape[0])
        out = train_step(
            run.net, x, y, run.loss_fn, run.optimizer,
            reg=run.reg if use_reg else None, lam=cfg.fam.lam, sam=use_sam, generator=probes, amp=run.amp,
            loss_scale=loss_scale, penalty_scale=penalty_scale,
        )
        sums["loss"] += out.loss.to(torch.float64) * x.shape[0]
        if out.penalty is not None:
            sums["penalty"] += out.penalty.to(torch.float64)
            sums["trace"] += out.trace.to(torch.float64)
            sums["norm_sq"] += out.norm_sq.to(torch.float64)
            reg_steps += 1
        bar.update(out)
        if interrupt is not None and interrupt.requested and i + 1 < run.steps_per_epoch:  # at the epoch's last step: finish it normally
            bar.close()
            run.save_state(epoch, i + 1, sums=sums, reg_steps=reg_steps, elapsed=elapsed + time.perf_counter() - t0,
                           probes=probes.get_state())
            raise _interrupted(run.run_dir, epoch, i + 1)
    bar.close()
    return sums, reg_steps, elapsed + time.perf_counter() - t0


def _epoch_record(run: _Run, epoch: int, sums: dict[str, torch.Tensor], reg_steps: int, seconds: float) -> dict[str, Any]:
    """The epoch's metrics record from its sums (one host sync, summed over ranks)."""
    cfg = run.cfg
    summary = {k: float(v) for k, v in zip(sums, distributed.epoch_sums(torch.stack(list(sums.values())), run.dinfo).tolist())}
    record: dict[str, Any] = {
        "epoch": epoch,
        "method": cfg.train.method,
        "dice_loss": summary["loss"] / len(run.data.train),
        "reg_steps": reg_steps,
        "regularizer": summary["penalty"] / reg_steps if reg_steps else None,
        "trace": summary["trace"] / reg_steps if reg_steps else None,
        "norm_sq": float(_layer_norm_sq(run.model, cfg.fam.layers)),
        "sam": cfg.train.method in SAM_LIKE and epoch >= cfg.sam.start_epoch,
        "amp": run.amp,
        "compiled": run.compiled,
        "seconds": seconds,
    }
    if record["trace"] is not None:
        record["kappa_hat"] = summary["norm_sq"] / reg_steps * record["trace"]
    if cfg.train.method in FAM_METHODS:  # every epoch: how strong lam is, on the gradients' scale
        record["fam_grad_ratio"], _ = fam_grad_ratio(run.model, run.data.train, cfg, run.loss_fn, epoch, run.dev)
    return record


def _validate(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """On validation epochs: DSC on the validation split (chooses best) and on every evaluation split (monitored), and
    Tr(H) / kappa-hat for methods that do not train with them."""
    cfg = run.cfg
    if not (cfg.train.val_every > 0 and (epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs)):
        return
    if run.data.val is not None:
        # The validation split carved from the training cases: the only DSC that chooses best.safetensors.
        record["selection_dsc"] = float(evaluate_dsc(run.model, run.data.val, 2 * cfg.train.batch_size))
    if run.data.evals:
        # Monitoring only (held-out curves), never a checkpoint choice. In float32 whatever train.amp: what
        # `skullrec predict`, which runs in float32, would give on these 64^3 cases.
        val = {name: evaluate_dsc(run.model, split, 2 * cfg.train.batch_size) for name, split in run.data.evals.items()}
        record["val_dsc"] = dict(zip(val, torch.stack(list(val.values())).tolist()))
        record["val_dsc_mean"] = sum(record["val_dsc"].values()) / len(val)
    if cfg.train.method not in FAM_METHODS:
        # One evaluation of the regulariser gives both: what lambda = 1 would give here (divide a target ratio
        # by it to choose lambda), and Tr(H) / kappa-hat of the FAM layers on the first training batch.
        ratio, term = fam_grad_ratio(run.model, run.data.train, cfg, run.loss_fn, epoch, run.dev, lam=1.0)
        trace, norm_sq = float(term.trace.detach()), float(term.norm_sq.detach())
        record.update(monitor_trace=trace, monitor_kappa_hat=trace * norm_sq, monitor_fam_grad_ratio_per_lam=ratio)


def _save_epoch(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """Checkpoints (chosen epochs, best, last), then metrics.jsonl, then state.pt: the epoch's commit, in that order."""
    cfg = run.cfg
    # best.safetensors: the highest DSC on the validation split carved from the training cases, else the lowest
    # training Dice loss; the evaluation splits (the held-out skulls) never choose a checkpoint.
    if "selection_dsc" in record:
        score, by = record["selection_dsc"], "selection_dsc"
    elif run.data.val is not None:  # not a validation epoch: keep the best so far
        score, by = None, "selection_dsc"
    else:
        score, by = -record["dice_loss"], "train_dice_loss"
    meta = {"epoch": epoch, "method": cfg.train.method, "dice_loss": record["dice_loss"], "val_dsc": record.get("val_dsc")}
    save = distributed.main_only(save_checkpoint)
    if epoch in cfg.train.checkpoint_epochs:
        save(checkpoint_path(run.run_dir, epoch), run.model, cfg, **meta)
    if score is not None and (run.best_score is None or score > run.best_score):
        run.best_score, run.best_epoch = score, epoch
        save(run.run_dir / BEST, run.model, cfg, best_by=by, **meta)
    save(run.run_dir / LAST, run.model, cfg, **meta)
    record["best_epoch"] = run.best_epoch
    run.records.append(record)
    distributed.main_only(write_metrics)(run.run_dir / METRICS_FILE, run.records)
    run.save_state(epoch, 0)


def _interrupted(run_dir: Path, epoch: int, step: int) -> KeyboardInterrupt:
    """The KeyboardInterrupt a stopped run raises; its message (printed by the CLI) says how to continue."""
    where = f"epoch {epoch} step {step}" if step else f"the start of epoch {epoch}"
    return KeyboardInterrupt(
        f"interrupted: state saved in {run_dir / STATE_FILE}; continue from {where} with: skullrec train --resume {run_dir}"
    )


def fam_grad_ratio(model: torch.nn.Module, split: TensorSplit, cfg: Config, loss_fn: Callable, epoch: int,
                   dev: torch.device, lam: float | None = None) -> tuple[dict[str, float], Any]:
    """||grad(lam * FAM)|| / ||grad(Dice loss)|| of the training objective on the first training batch, and the FamTerm.

    Over all parameters (``all``) and on each regularised layer's weight. The objective's own scaling
    (fam_authors: 80 * sum) and lam (``cfg.fam.lam`` unless given) apply. Measured with the whole-batch
    form of the configured estimator (a subset estimator's noise would make the per-epoch ratio jump;
    its expectation is the same) and its own probe stream, so training is unaffected.
    """
    import dataclasses

    from ..flatness.regularizer import SUBSET_ESTIMATORS, FamRegularizer, ratio_and_term

    fam = cfg.fam
    if fam.estimator in SUBSET_ESTIMATORS:
        fam = dataclasses.replace(fam, estimator="fd")
    x, y = split.batch(torch.arange(min(cfg.train.batch_size, len(split)), device=split.defective.device))
    loss_scale, penalty_scale = objective_scales(cfg, x.shape[0])
    reg = FamRegularizer(fam, model)
    gen = make_generator(dev, cfg.seed, epoch, STREAM_MONITOR)
    out = ratio_and_term(model, x, y, loss_fn, reg, gen, lam=fam.lam if lam is None else lam,
                         loss_scale=loss_scale, penalty_scale=penalty_scale)
    model.zero_grad(set_to_none=True)
    return out


def _summary_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {_fmt(r['dice_loss'])}"]
    if r.get("trace") is not None:
        parts += [f"reg {_fmt(r['regularizer'], '.3g')}", f"TrH {_fmt(r['trace'], '.3g')}", f"kappa {_fmt(r.get('kappa_hat'), '.3g')}"]
    elif r.get("monitor_trace") is not None:
        parts += [f"TrH {_fmt(r['monitor_trace'], '.3g')}", f"kappa {_fmt(r['monitor_kappa_hat'], '.3g')}"]
    parts.append(f"|w|^2 {_fmt(r['norm_sq'], '.4g')}")
    if r.get("fam_grad_ratio"):
        parts.append(f"ratio {_fmt(r['fam_grad_ratio']['all'], '.3g')}")
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
    from ..nets.autoencoder import check_parameter_count, state_shapes

    log = log or (lambda s: None)
    if resume is not None and Path(config) == Path(resume) / CONFIG_FILE:
        # the run's own config, written by an earlier (maybe older) skullrec: legacy keys filled in
        cfg = load_stored_config(config, overrides)
    else:
        cfg = load_config(config, overrides)
    try:  # refused before the run folder is touched (the shapes come from the meta device: nothing allocated)
        check_parameter_count(state_shapes(cfg.model))
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}" if config is not None else str(exc)) from None
    dinfo, dev = distributed.setup(resolve_device(device))
    lock = None
    folder = Path(resume) if resume is not None else Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    try:
        distributed.check_batch_size(cfg.train.batch_size, dinfo)
        # The data set and a new run's config file are inputs: the run folder may not overlap them
        # (on --resume the config is the run's own, inside the folder).
        check_outside_inputs(folder, [cfg.data.root] + ([config] if resume is None else []))
        if resume is None and dinfo.is_main:
            check_new_run_dir(folder, overwrite)
        # Data problems (missing split, wrong size) are reported before the run folder is touched.
        data = load_training_data(cfg.data, cfg.model.size, dev)
        if dinfo.is_main:  # one writer, holding the folder until it exits; if it fails, torchrun stops the other ranks
            lock = lock_run_dir(folder)
            cfg = settle_run_dir(cfg, folder, resume=resume is not None, force=force, overwrite=overwrite)
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
    "StepResult",
    "train_step",
    "make_optimizer",
    "make_run",
    "evaluate_dsc",
    "train",
    "run_training",
]
