"""How the trainer makes its step fast on the machine at hand: bf16 autocast and torch.compile.

Two switches of the training config, each with an ``"auto"`` default resolved here once per run:

* ``train.amp`` ("auto" | "bf16" | "none"): "auto" is bf16 autocast where the hardware computes bf16
  natively (a CPU with AVX-512 BF16 or AMX, a CUDA device that supports bf16), float32 otherwise
  (without hardware support bf16 is emulated; not expected to pay, not measured here). The fast FAM estimators then run their second-difference
  passes in float32 (skullrec.flatness.fast: the difference is below bf16's resolution).
* ``train.compile`` (true | false | "auto"): ``torch.compile`` of the model's forward pass (and so of
  its backward), inductor, static shapes. Compiling costs tens of seconds once per process
  (docs/explanation/performance.md), so "auto" compiles only a run of at least :data:`COMPILE_MIN_STEPS` steps, in one
  process (not under DDP, where it is untested), and only where a compiler backend is present (a C++
  compiler on CPU, triton on CUDA). The validation passes stay eager (model.eval() would recompile) and float32 (trainer._validate).
  A step that differentiates twice (:func:`needs_double_backward`) is never compiled.

Safe fallback: before the first step, :func:`prepare` runs one trial forward and backward of the
compiled module on the first batch (no optimizer step, gradients discarded); if compiling fails, the
run continues eagerly with a warning. The trial has no side effect on training (no random numbers are
drawn, the FAM taps are cleared), so a run resumes exactly whether or not it compiled.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..utils import unwrap

# Steps from which "auto" compiles. Measured (docs/explanation/performance.md, 64^3, batch 4, CPU): compiling saves
# ~0.1 of a float32 eager step on top of bf16 (bf16 0.68-0.71x -> bf16 + compile 0.59-0.61x), i.e. ~14 ms
# per step on a quiet 2-thread machine, and the first compile took ~30 s there (53-99 s under heavy load):
# break-even near 2,000 steps. The paper protocol (4,000-5,000 steps) compiles; short runs and tests do not.
COMPILE_MIN_STEPS = 2000


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (where bf16 autocast is faster than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        # Private probes of torch's own CPU dispatch (there is no public one); absent -> not native.
        checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(bool(f()) for f in checks if f is not None)
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` as run on ``device``: "bf16" or "none" ("auto": bf16 where it is native)."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    return amp


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile's inductor backend can generate code for ``device`` here."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return False


# The FAM estimators that need only first-order autograd (skullrec.flatness.fast).
FIRST_ORDER_ESTIMATORS = ("fd", "fd-half", "fd-quarter")


def needs_double_backward(cfg: Any) -> bool:
    """Whether the training step of ``cfg`` (a Config) differentiates twice through the model.

    A compiled (AOTAutograd) backward cannot be differentiated again, so such a step stays eager:
    FAM with the autograd / outspace estimators, or where the fd estimators fall back to autograd
    (layers other than exactly decodeL, a BatchNorm decoder).
    """
    from ..config import FAM_METHODS

    if cfg.train.method not in FAM_METHODS:
        return False
    return cfg.fam.estimator not in FIRST_ORDER_ESTIMATORS or list(cfg.fam.layers) != ["decodeL"] or cfg.model.norm == "batch"


def resolve_compile(value: bool | str, device: torch.device, total_steps: int, distributed: bool, double_backward: bool = False) -> bool:
    """``train.compile`` as run: an explicit true/false, or "auto" (long single-process runs with a compiler).

    Never for a step that differentiates twice (:func:`needs_double_backward`), even when asked for.
    """
    if double_backward:
        return False
    if value != "auto":
        return bool(value)
    return total_steps >= COMPILE_MIN_STEPS and not distributed and compiler_available(device)


def amp_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``amp`` ("bf16": bfloat16 autocast; "none": nothing)."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CompiledNet(nn.Module):
    """``torch.compile`` of a network, with the network itself as ``.module`` (what :func:`skullrec.utils.unwrap` finds).

    The forward goes through the compiled function; parameters, hooks and submodules are the network's
    own (the FAM estimators run their extra decoder passes eagerly on them).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.module = net
        # Not a registered submodule: the compiled wrapper shares net's parameters.
        object.__setattr__(self, "compiled", torch.compile(net, dynamic=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dynamo skips guards on module hooks by default, so a graph compiled for a model without the FAM
        # taps (skullrec.flatness.fast) would be reused, hooks silently not run, for one with them.
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self.compiled(x)


def trial_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, amp: str) -> None:
    """One forward and backward of ``net`` on (x, y) without an optimizer step; gradients and FAM taps are discarded."""
    with amp_context(amp, x.device):
        loss = loss_fn(net(x).float(), y)
    loss.backward()
    _discard(net)


def prepare(
    net: nn.Module,
    compile_: bool,
    amp: str,
    example: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable,
    warn: Callable[[str], None] | None = None,
) -> tuple[nn.Module, bool]:
    """(the network the step trains, whether it is compiled): ``net`` itself, or its :class:`CompiledNet`.

    Compiling is tried on ``example`` (one batch) by :func:`trial_step`; any failure (no compiler,
    an unsupported operation) gives a warning and the eager ``net``.
    """
    if not compile_:
        return net, False
    compiled = CompiledNet(net)
    try:
        trial_step(compiled, *example, loss_fn, amp)
    except Exception as exc:  # a failing backend must not stop training: fall back to eager
        msg = f"train.compile: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); training eagerly"
        (warn or (lambda s: warnings.warn(s, stacklevel=2)))(msg)
        _discard(net)
        return net, False
    return compiled, True


def _discard(net: nn.Module) -> None:
    """Drop what a trial step left behind (gradients, FAM taps)."""
    plain = unwrap(net)
    plain.zero_grad(set_to_none=True)
    taps = getattr(plain, "_fast_fam_taps", None)
    if taps is not None:
        taps.clear()


def describe(amp: str, compiled: bool) -> str:
    """A short phrase for the run's log line, e.g. 'bf16, compiled'."""
    return f"{'bf16' if amp == 'bf16' else 'float32'}, {'compiled' if compiled else 'eager'}"


__all__ = [
    "COMPILE_MIN_STEPS",
    "CompiledNet",
    "amp_context",
    "compiler_available",
    "needs_double_backward",
    "describe",
    "native_bf16",
    "prepare",
    "resolve_amp",
    "resolve_compile",
    "trial_step",
]
