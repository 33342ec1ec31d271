"""Several runs of a sweep trained together in one process: stacked weights, one forward call, one optimizer.

Runs that differ only in their seed (and name) share architecture, data, schedule and optimizer
settings; :func:`train_batched` trains them as one: ``torch.func.stack_module_state`` stacks their
weights along a new leading axis, every model runs on its own batch (each run keeps its own epoch
order, drawn from its seed), the per-run Dice losses are summed (the gradient of a sum of
independent losses is each run's own gradient) and one optimizer of the trainer's kind
(:func:`skullrec.training.trainer.make_optimizer`) steps the stacked tensors. Adam is elementwise,
so stacked it updates every run exactly as separate optimizers would (tests/training/test_batched.py
checks this bit for bit).

The forward call (:func:`default_forward`): on a GPU one ``vmap(functional_call)``, which turns the N
convolutions of a layer into one grouped convolution; on a CPU a loop of ``functional_call`` over the
models' slices of the stacked weights. The loop runs the kernels a run alone runs, so on a CPU every
batched run is **bit-for-bit** the run trained alone by ``skullrec train`` (test_batched.py trains
both and compares every weight with ``torch.equal``). The grouped kernel sums in another order:
forward outputs differ in the last float32 bit (~3e-7) and gradients by ~1e-6 of their norm, and
Adam's normalised step carries that into the weights (a few 1e-4 after tens of steps at lr 1e-3;
the test states its bound), so a vmapped run is a valid run of its seed, not a bitwise replay.

Every run folder is written as ``skullrec train`` writes it (config.yaml, the chosen epochs'
checkpoints, best / last, metrics.jsonl, state.pt with the run's own optimizer state), so
``skullrec experiment`` evaluates the runs as usual and an interrupted one is resumed by the ordinary
trainer. Scope: ``train.method: baseline`` (no FAM term, no SAM step), float32 and eager (``train.amp``
and ``train.compile`` "auto" are settled to none / false and recorded so; an explicit bf16 or compile is
trained on its own), a single process;
no per-epoch validation DSC or Tr(H) monitor is computed (the experiment scores the checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from ..config import Config
from ..data.cache import load_training_data
from ..nets.checkpoint import save_checkpoint, save_training_state
from ..utils import resolve_device
from .run_dir import BEST, LAST, METRICS_FILE, STATE_FILE, checkpoint_path, lock_run_dir, settle_run_dir, write_metrics

BATCHABLE_METHODS = ("baseline",)


def batch_key(cfg: Config) -> str | None:
    """What runs trained together must share (the whole config but name and seed), or None for a run that cannot be batched."""
    # Batched runs train float32 and eagerly (vmap over a compiled or autocast forward is not supported):
    # the "auto" speed switches are settled that way (:func:`float32_eager`), an explicit bf16 or compile
    # cannot be honoured, so such a run is trained on its own.
    if cfg.train.method not in BATCHABLE_METHODS or cfg.train.amp == "bf16" or cfg.train.compile is True:
        return None
    d = float32_eager(cfg).to_dict()
    d.pop("name", None)
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True, default=str)


def float32_eager(cfg: Config) -> Config:
    """``cfg`` with the speed switches as a batched run trains: ``train.amp: none``, ``train.compile: false``.

    A run folder records these (not "auto"), so resuming it with ``skullrec train`` continues as it trained.
    """
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="none", compile=False))


FORWARD_MODES = ("vmap", "loop")


def default_forward(device: torch.device) -> str:
    """How stacked models run on ``device``: ``vmap`` on a GPU, ``loop`` on a CPU.

    On a GPU a single 64^3 run is launch-bound and one grouped kernel for all runs fills the device.
    On a CPU a step is compute-bound already, and vmap's grouped 3D convolution was 1.3x (idle) to 3.2x
    (loaded machine) *slower* than the runs one after another at 64^3 (benchmarks/sweep_batched.py,
    docs/explanation/performance.md); the loop
    runs each model's convolutions with the kernel a run alone uses, so its runs are bit-for-bit the
    runs trained alone (tests/training/test_batched.py).
    """
    return "vmap" if device.type == "cuda" else "loop"


class StackedModels:
    """N models of one architecture as one: their weights stacked on a leading axis, one forward call.

    ``forward="vmap"``: one ``vmap(functional_call)`` (grouped convolutions); ``"loop"``: each model in
    turn through ``functional_call`` on its slice of the stacked weights (the single-model kernels).
    Either way the weights are one set of stacked leaves, stepped by one optimizer.
    """

    def __init__(self, models: list[torch.nn.Module], forward: str = "vmap") -> None:
        if forward not in FORWARD_MODES:
            raise ValueError(f"forward must be one of {FORWARD_MODES}, got {forward!r}")
        # The template holds no data ("meta"): functional_call only needs its structure.
        self.template = copy.deepcopy(models[0]).to("meta")
        self.params, self.buffers = stack_module_state(models)
        self.n = len(models)
        self.forward = forward

    def _one(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, B, 1, S, S, S) inputs, one batch per model -> (N, B, C, S, S, S) logits."""
        if self.forward == "vmap":
            return vmap(self._one)(self.params, self.buffers, xs)
        # Slicing a stacked leaf gives model i's contiguous weights; the backward of the slice writes
        # model i's gradient into its row of the stacked gradient and zeros elsewhere (x + 0 is exact).
        return torch.stack([
            self._one({k: v[i] for k, v in self.params.items()}, {k: v[i] for k, v in self.buffers.items()}, xs[i])
            for i in range(self.n)
        ])

    def parameters(self) -> list[torch.Tensor]:
        """The stacked parameters (leaves with gradients), in each model's ``named_parameters`` order."""
        return list(self.params.values())

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Model ``i``'s own state dict (copies)."""
        return {k: v[i].detach().clone() for k, v in {**self.params, **self.buffers}.items()}


def batched_step(stack: StackedModels, xs: torch.Tensor, ys: torch.Tensor, loss_fn: Callable, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One step of every run: per-run Dice losses, backward of their sum, one optimizer step; the (N,) detached losses."""
    optimizer.zero_grad(set_to_none=True)
    logits = stack(xs)
    # The loss outside vmap: MONAI's one-hot uses an in-place scatter that vmap cannot batch.
    losses = torch.stack([loss_fn(logits[i].float(), ys[i]) for i in range(stack.n)])
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def _run_optimizer_state(cfg: Config, model: torch.nn.Module, stack: StackedModels, stacked_opt: torch.optim.Optimizer, i: int) -> dict[str, Any]:
    """Run ``i``'s optimizer state dict, as its own optimizer would hold it (slices of the stacked moments)."""
    from .trainer import make_optimizer

    opt = make_optimizer(cfg, model)
    for (name, p), sp in zip(model.named_parameters(), stack.parameters()):
        st = stacked_opt.state.get(sp)
        if st:
            opt.state[p] = {k: (v.clone() if k == "step" or v.ndim == 0 else v[i].clone()) for k, v in st.items()}
    return opt.state_dict()


def train_batched(
    cfgs: list[Config], run_dirs: list[Path], device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
    forward: str | None = None,
) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (all with one :func:`batch_key`) together into new folders ``run_dirs``; their last records.

    ``forward``: ``"vmap"`` or ``"loop"`` (:class:`StackedModels`); None takes :func:`default_forward` of the device.
    """
    from ..nets.autoencoder import build_model, loss_function
    from .trainer import _layer_norm_sq, _torch_settings, make_optimizer

    log = log or (lambda s: None)
    keys = {batch_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError("train_batched: runs must be baseline runs that differ only in name and seed")
    cfg0 = cfgs[0]
    dev = resolve_device(device)
    locks = [lock_run_dir(Path(d)) for d in run_dirs]
    try:
        cfgs = [settle_run_dir(float32_eager(c), Path(d), resume=False, force=False, overwrite=False) for c, d in zip(cfgs, run_dirs)]
        with _torch_settings(cfg0, dev):
            data = load_training_data(cfg0.data, cfg0.model.size, dev)
            models = [build_model(c.model, seed=c.seed).to(dev).train() for c in cfgs]
            mode = forward or default_forward(dev)
            stack = StackedModels(models, forward=mode)
            optimizer = make_optimizer(cfg0, stack)  # the trainer's optimizer, over the stacked tensors
            loss_fn = loss_function(cfg0.model.loss)
            n_train, bs = len(data.train), cfg0.train.batch_size
            steps = math.ceil(n_train / bs)
            log(f"training {len(cfgs)} runs together ({', '.join(c.name for c in cfgs)}) on {dev}, forward {mode}")
            records: list[list[dict[str, Any]]] = [[] for _ in cfgs]
            best: list[tuple[float | None, int | None]] = [(None, None)] * len(cfgs)
            for epoch in range(1, cfg0.train.epochs + 1):
                orders = [data.epoch_order(c.seed, epoch, bs) for c in cfgs]
                sums = torch.zeros(len(cfgs), dtype=torch.float64, device=dev)
                t0 = time.perf_counter()
                for s in range(steps):
                    pairs = [data.train.batch(o[s]) for o in orders]
                    xs, ys = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                    sums += batched_step(stack, xs, ys, loss_fn, optimizer).to(torch.float64) * xs.shape[1]
                seconds = time.perf_counter() - t0
                for i, (c, d, m) in enumerate(zip(cfgs, run_dirs, models)):
                    m.load_state_dict(stack.state_dict(i))
                    rec = {"epoch": epoch, "method": c.train.method, "dice_loss": float(sums[i]) / n_train, "reg_steps": 0,
                           "regularizer": None, "trace": None, "norm_sq": float(_layer_norm_sq(m, c.fam.layers)), "sam": False,
                           "seconds": seconds, "batched_runs": len(cfgs), "batched_forward": mode}
                    _save_epoch(c, Path(d), m, rec, records[i], best, i, epoch, _run_optimizer_state(c, m, stack, optimizer, i), data)
                log(f"epoch {epoch}/{cfg0.train.epochs}  loss " + " ".join(f"{r[-1]['dice_loss']:.4f}" for r in records) + f"  {seconds:.1f} s")
        return [r[-1] for r in records]
    finally:
        for lock in locks:
            lock.close()


def _save_epoch(cfg: Config, run_dir: Path, model: torch.nn.Module, rec: dict[str, Any], records: list[dict[str, Any]],
                best: list[tuple[float | None, int | None]], i: int, epoch: int, opt_state: dict[str, Any], data: Any) -> None:
    """The files ``skullrec train`` writes at the end of an epoch, in its order (checkpoints, metrics, then state.pt)."""
    meta = {"epoch": epoch, "method": cfg.train.method, "dice_loss": rec["dice_loss"], "val_dsc": None}
    if epoch in cfg.train.checkpoint_epochs:
        save_checkpoint(checkpoint_path(run_dir, epoch), model, cfg, **meta)
    score = -rec["dice_loss"]  # no validation here: the trainer's fallback, the training loss
    if best[i][0] is None or score > best[i][0]:
        best[i] = (score, epoch)
        save_checkpoint(run_dir / BEST, model, cfg, best_by="train_dice_loss", **meta)
    save_checkpoint(run_dir / LAST, model, cfg, **meta)
    rec["best_epoch"] = best[i][1]
    records.append(rec)
    write_metrics(run_dir / METRICS_FILE, records)
    save_training_state(run_dir / STATE_FILE, {
        "model": model.state_dict(), "optimizer": opt_state, "epoch": epoch, "step": 0,
        "best_score": best[i][0], "best_epoch": best[i][1], "data": data.train.fingerprint, "config": cfg.to_dict(),
    })
