"""Fast estimators of the FAM term ||w||^2 * Tr(H) of the decoding layer ``decodeL`` (fam.estimator).

Plain autograd gets v^T H v of a weight w by a double backward and the *gradient* of the FAM term by a
third-order backward through the whole decoder: 4-6x the cost of a plain Dice+Adam step. The
estimators here compute the same quantity with less work, using two facts about ``decodeL``:

1. **Output-space factorisation.** z_n = W l_n + b, so the loss depends on W only through z and
   L(W + t V) = L(z + t u) with u_n = V l_n. Hence v^T H_W v = u^T (d^2 L / dz^2) u *exactly*: a
   Hutchinson probe V in weight space maps to a direction u in the 64-d output space, and the curvature
   only involves ``decode_features`` (the decoder after decodeL); nothing upstream is re-run. The full
   gradient of the penalty still reaches the encoder, through l in both z and u (nothing is detached).
2. **Second difference along u.** u^T H_z u = (L(z + eps u) - 2 L(z) + L(z - eps u)) / eps^2 + O(eps^2):
   two extra decoder passes, stacked along the batch (one call on [z + eps u, z - eps u]), and only a
   *first-order* backward through them gives the full gradient (the third derivative term included, up
   to O(eps^2)). L(z) is the training loss itself (captured from the trainer's forward pass).

**Kinks.** The decoder is piecewise linear in its activations (ReLU after decodeL, PReLU in every
block). Autograd's Hessian treats those as locally linear (second derivative 0), but a plain finite
difference across a kink sees a delta-like term whose expectation does *not* vanish as eps -> 0 (tens
of thousands of units sit within eps of their kink): on the real 64^3 model in float64 the plain
second difference did not converge to autograd's v^T H v even at eps = 1e-5 (docs/explanation/performance.md).
So the perturbed passes run with the activation pattern *frozen* to the unperturbed one (each ReLU /
PReLU / LeakyReLU applies the slope it had in the training forward pass). Along that path the loss is
smooth (transposed convolutions, GroupNorm, sigmoid, Dice) and its second derivative at 0 is exactly
autograd's v^T H v, so the bias is O(eps^2), and so is the gradient's.

Estimators (the table :data:`skullrec.flatness.regularizer.ESTIMATORS` names them; choose with ``fam.estimator``):

* ``"outspace"``: exact, reverse-mode autograd in the output space (double/third-order backward
  through decode_features only). Same value as "autograd" up to rounding; a reference, ~30 % cheaper.
* ``"fd"``: the frozen-kink second difference on the whole batch (2B extra decoder samples).
* ``"fd-half"``: the same on a random half of the batch (drawn from the probe generator). The Dice
  loss is a mean of per-sample losses (MONAI DiceLoss, batch=False), and the decoder has no
  cross-sample coupling (GroupNorm), so d^2L/dz^2 is block diagonal over samples and the mean of the
  per-sample curvatures over a uniformly random subset is an unbiased estimate of the batch's
  v^T H v (and of Tr(H) over the probes). It costs one extra decoder pass of B samples.
* ``"fd-quarter"``: the same on ceil(B/4) random samples (one at batch 4).

All honour fam.gradient (full / detached: the detached form runs the extra passes without a graph),
fam.norm, fam.trace and fam.samples (several probes share one stacked decoder call). Where they do not
apply (fam.layers other than exactly ["decodeL"], another model, a loss that is not a mean of
per-sample losses, or a decoder with BatchNorm) the
regulariser falls back to plain autograd with a one-time warning, so every configuration still trains.

Cost: the measured step cost of every estimator relative to a plain Dice+Adam step is in
docs/explanation/performance.md (benchmarks/step_cost.py). The decoder after decodeL is a large part of a plain
step, so the two extra decoder passes of any whole-batch estimator (exact or finite-difference) cost
about a plain step by themselves; the subset estimators pass fewer samples.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..utils import unwrap
from .hessian import FamTerm, fam_term, rademacher, shape_trace

# Step of the second difference in decodeL's output space, relative to the RMS of each sample's z (so that it
# follows the scale of the features as training changes them). Bias O(eps^2), rounding O(u/eps^2)
# with u ~ 1e-7 in float32: 3e-2 balances the two (gradient within ~0.6 % of autograd on the 64^3
# model in float32; docs/explanation/performance.md).
FD_EPS = 3e-2
# Activations that are piecewise linear and therefore get frozen in the perturbed passes.
_KINKED = (nn.ReLU, nn.PReLU, nn.LeakyReLU)




# ----------------------------------------------------------------------------------------------
# Taps: forward hooks that keep references to what the trainer's forward pass computed


@dataclass
class _Taps:
    """References (no copies) to the latest training forward pass: decodeL's input and output, the
    decoder's logits, and the input of every kinked activation of the decoder (autograd saves those
    for the backward anyway, so holding them costs no memory)."""

    latent: Tensor | None = None
    z: Tensor | None = None
    logits: Tensor | None = None
    act_inputs: dict[nn.Module, Tensor] = field(default_factory=dict)
    # While set: (subset index or None, repeats) -> kinked activations apply the frozen slopes.
    frozen: tuple[Tensor | None, int] | None = None
    handles: list[Any] = field(default_factory=list)

    def clear(self) -> None:
        self.latent = self.z = self.logits = None
        self.act_inputs = {}


def _recording() -> bool:
    return torch.is_grad_enabled()


def attach_taps(model: nn.Module) -> _Taps:
    """Install (once) the forward hooks the fast estimators read; returns the model's taps.

    Hooks only record while autograd is on (training forward passes), so evaluation under no_grad is
    unaffected. Call before the forward pass whose loss the regulariser uses; the estimators fall
    back to recomputing that pass (once) when the taps are missing.
    """
    net = unwrap(model)
    taps = getattr(net, "_fast_fam_taps", None)
    if taps is not None:
        return taps
    taps = _Taps()

    def on_decodel(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if _recording() and taps.frozen is None:
            taps.clear()
            taps.latent, taps.z = inp[0], out

    def on_decoder(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if _recording() and taps.frozen is None:
            taps.logits = out

    def on_act(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if taps.frozen is None and _recording():
            taps.act_inputs[mod] = inp[0]

    taps.handles.append(net.decodeL.register_forward_hook(on_decodel))
    taps.handles.append(net.decoder.register_forward_hook(on_decoder))
    for mod in net.decoder.modules():
        if isinstance(mod, _KINKED):
            taps.handles.append(mod.register_forward_hook(on_act))
    net._fast_fam_taps = taps
    return taps


def detach_taps(model: nn.Module) -> None:
    """Remove the hooks of :func:`attach_taps` (e.g. before saving or timing a plain model)."""
    net = unwrap(model)
    taps = getattr(net, "_fast_fam_taps", None)
    if taps is not None:
        for h in taps.handles:
            h.remove()
        del net._fast_fam_taps


def _slope(mod: nn.Module, ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The slope each unit of a kinked activation had at input ``ref`` (what autograd differentiates), in ``dtype``
    (default ``ref``'s; the bf16 path asks for float32, so that a PReLU weight is not rounded to bf16)."""
    dtype = dtype or ref.dtype
    pos = ref > 0
    if isinstance(mod, nn.PReLU):
        w = mod.weight
        neg = w.view(1, -1, *([1] * (ref.dim() - 2))) if w.numel() > 1 else w
        return torch.where(pos, torch.ones((), dtype=dtype, device=ref.device), neg.to(dtype))
    if isinstance(mod, nn.LeakyReLU):
        return torch.where(pos, 1.0, mod.negative_slope).to(dtype)
    return pos.to(dtype)


@contextlib.contextmanager
def _frozen(taps: _Taps, idx: Tensor | None, reps: int, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within: each kinked activation of the decoder is the linear map with its recorded slopes.

    The input is ``reps`` stacked copies of the recorded samples ``idx``; the slope of the recorded
    pass (with its graph to a PReLU's weight) multiplies the perturbed input, broadcast over the copies.
    Done by overriding the module's ``forward`` (an instance attribute) rather than a forward hook, so
    the discarded nonlinear activation is never computed.
    """
    taps.frozen = (idx, reps)
    mods = list(taps.act_inputs)
    try:
        for mod in mods:
            ref = taps.act_inputs[mod]
            slope = _slope(mod, ref if idx is None else ref[idx], dtype)

            def frozen_forward(x: Tensor, slope: Tensor = slope) -> Tensor:
                return (x.view(reps, *slope.shape) * slope).view(x.shape)

            mod.forward = frozen_forward
        yield
    finally:
        for mod in mods:
            mod.__dict__.pop("forward", None)
        taps.frozen = None


def _applicable(reg: Any, model: nn.Module, x: Tensor, loss_fn: Callable) -> str | None:
    """None when the output-space estimators apply, else why not (then plain autograd is used)."""
    net = unwrap(model)
    if list(reg.layers) != ["decodeL"]:
        return f"fam.layers is {list(reg.layers)} (the fast estimators cover exactly ['decodeL'])"
    if not all(hasattr(net, a) for a in ("decodeL", "decoder", "decode_features", "bottleneck_shape")):
        return "the model is not a SkullAutoEncoder"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.decoder.modules()):
        return "the decoder couples samples (BatchNorm)"
    if getattr(loss_fn, "batch", False) or str(getattr(getattr(loss_fn, "reduction", "mean"), "value", getattr(loss_fn, "reduction", "mean"))) != "mean":
        return "the loss is not a mean of per-sample losses"
    return None


def _autocast_16bit(device: torch.device) -> bool:
    """Whether the caller's forward pass runs under 16-bit autocast (bf16 / fp16) on ``device``."""
    dev = device.type
    return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in (torch.bfloat16, torch.float16)


_WARNED: set[str] = set()


def _fallback(name: str, why: str, reg: Any, *args: Any) -> FamTerm:
    """Plain autograd instead of a fast estimator that does not apply (warned once per reason)."""
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"fam.estimator={name}: {why}; using fam.estimator=autograd", stacklevel=3)
    return autograd_estimator(reg, *args)


def _forward_pieces(net: nn.Module, taps: _Taps, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(latent, z, logits, recomputed) of the forward pass that produced the loss.

    Recomputed (and then recorded by the taps) when not captured: the first call, before the hooks
    existed, or a capture of another batch.
    """
    ok = (
        taps.latent is not None and taps.z is not None and taps.logits is not None
        and taps.latent.shape[0] == x.shape[0] and taps.logits.shape[0] == x.shape[0]
    )
    if ok:
        return taps.latent, taps.z, taps.logits, False
    latent = net.encode(x)
    z = net.decodeL(latent)
    logits = net.decode_features(z)
    if taps.z is not z:  # the hooks did not record (autograd off): there is nothing to freeze from
        raise ConfigError("fam.estimator: the fast estimators need the training forward pass under autograd")
    return latent, z, logits, True


def _norm_of(weight: Tensor, norm: str) -> Tensor:
    n2 = (weight * weight).sum()
    return n2 if norm == "squared" else n2.sqrt()


def _finish(reg: Any, weight: Tensor, trace: Tensor) -> FamTerm:
    cfg = reg.cfg
    t_used = shape_trace(trace, cfg.trace)
    if cfg.gradient != "full":
        t_used = t_used.detach()
    n2 = (weight * weight).sum()
    penalty = _norm_of(weight, cfg.norm) * t_used
    tr = trace.detach()
    # per_layer stays empty: filling it with floats would sync the device in every step.
    return FamTerm(penalty=penalty, trace=tr, norm_sq=n2.detach())


def _subset(batch: int, fraction: float, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
    if fraction >= 1.0 or batch == 1:
        return None
    m = max(1, math.ceil(fraction * batch))
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(batch, generator=generator, device=gdev)[:m].to(device)


def fd_quadratic_form(
    net: nn.Module,
    taps: _Taps,
    latent: Tensor,
    z: Tensor,
    logits: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    probes: Tensor,
    idx: Tensor | None = None,
    eps: float = FD_EPS,
    recentre: bool = False,
) -> Tensor:
    """Mean over probes V (k, out, in) of the frozen-kink second difference of the loss along u = V l.

    Returns the Hutchinson estimate of v^T H_W v averaged over the probes (and over the samples
    ``idx`` when given), with the graph of whatever ``latent``, ``z``, ``logits`` carry.

    ``recentre=True`` (the training pass ran under bf16 autocast): the three points of the difference
    are all evaluated here in float32, z = decodeL(latent) and the centre L(z) included, so that the
    centre and the two sides share one precision. Centring on the bf16 training logits instead would
    put their rounding (~4e-3 of the loss) into a difference of ~1e-4. ``logits`` is then unused and the
    caller disables autocast; the activation slopes stay those of the training pass.
    """
    k = probes.shape[0]
    kinked = [mod for mod in net.decoder.modules() if isinstance(mod, _KINKED)]
    if any(taps.act_inputs.get(mod) is None or taps.act_inputs[mod].shape[0] != z.shape[0] for mod in kinked):
        raise RuntimeError("fast FAM estimator: the decoder's activations were not recorded with this batch")
    if idx is not None:
        latent, z, logits, y = latent[idx], z[idx], logits[idx], y[idx]
    if recentre:
        latent = latent.float()
        z = F.linear(latent, net.decodeL.weight.float(), None if net.decodeL.bias is None else net.decodeL.bias.float())
    m = z.shape[0]
    # Per-sample step relative to that sample's feature scale; a detached constant (no gradient).
    # Per sample, so that a sample's estimate does not depend on which batch or shard it is in.
    step = eps * z.detach().pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)  # (m, 1)
    u = torch.einsum("koi,ni->kno", probes.to(latent.dtype), latent)  # (k, m, out)
    # ReLU after decodeL, frozen: relu(z + s u) -> relu(z) + s * 1[z > 0] u.
    du = step * (z > 0).to(z.dtype) * u
    h = F.relu(z)
    sides = [(h + du).reshape(k * m, -1), (h - du).reshape(k * m, -1)]
    c = 1 if recentre else 0  # copies of the centre in the stacked call
    hp = torch.cat([h] * c + sides)  # ((c + 2 k) m, out)
    with _frozen(taps, idx, c + 2 * k, z.dtype if recentre else None):
        out = net.decoder(hp.reshape((c + 2 * k) * m, *net.bottleneck_shape))
    if recentre:
        logits, out = out[:m], out[m:]
    # Per-sample losses (the loss is a mean over samples), in float64: the second difference is
    # ~1e-4 of the loss, close to float32's resolution there.
    yd = y.double()
    center = torch.stack([loss_fn(logits[n : n + 1].double(), yd[n : n + 1]) for n in range(m)])  # (m,)
    side = torch.stack([loss_fn(out[j : j + 1].double(), yd[j % m : j % m + 1]) for j in range(2 * k * m)])
    second = side.reshape(2, k, m).sum(0) - 2 * center  # (k, m)
    return (second / step.reshape(1, m).double() ** 2).mean().to(z.dtype)


def autograd_estimator(
    reg: Any, model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, loss: Tensor, generator: torch.Generator | None
) -> FamTerm:
    """Plain autograd on the loss's own graph (:func:`skullrec.flatness.hessian.fam_term`): any model, any layers."""
    cfg = reg.cfg
    return fam_term(
        loss, reg.weights(model), samples=cfg.samples, gradient=cfg.gradient, norm=cfg.norm, trace=cfg.trace,
        generator=generator, names=reg.layers,
    )


def fd_estimator(reg: Any, model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, loss: Tensor,
                  generator: torch.Generator | None, *, fraction: float = 1.0, name: str = "fd") -> FamTerm:
    why = _applicable(reg, model, x, loss_fn)
    if why is not None:
        return _fallback(name, why, reg, model, x, y, loss_fn, loss, generator)
    net = unwrap(model)
    taps = attach_taps(net)
    latent, z, logits, _ = _forward_pieces(net, taps, x)
    weight = net.decodeL.weight
    probes = rademacher(reg.cfg.samples, weight, generator)
    idx = _subset(x.shape[0], fraction, generator, x.device)
    # Under 16-bit autocast the difference passes run in float32, centre included: in bf16 the second
    # difference (~1e-4 of the loss) drowns in rounding (~4e-3; on the small model a bf16 estimate of
    # v^T H v was 0.0005 against 0.0148 in float32, gradient cosine 0.16). The training forward and
    # backward stay in bf16; only these m (1 + 2k) decoder samples pay float32.
    recentre = _autocast_16bit(x.device)
    amp_off = torch.autocast(x.device.type, enabled=False) if recentre else contextlib.nullcontext()
    with torch.set_grad_enabled(reg.cfg.gradient == "full" and torch.is_grad_enabled()), amp_off:
        trace = fd_quadratic_form(net, taps, latent, z, logits, y, loss_fn, probes, idx, eps=FD_EPS, recentre=recentre)
    taps.clear()  # each capture is used once: a stale one is never read by a later step
    return _finish(reg, weight, trace)


def outspace_quadratic_form(z: Tensor, latent: Tensor, loss: Tensor, probes: Tensor, create_graph: bool = True) -> Tensor:
    """Exact mean over probes of u^T (d^2 loss / dz^2) u with u = V l, by reverse-over-reverse autograd in z."""
    (gz,) = torch.autograd.grad(loss, z, create_graph=True, retain_graph=True)
    total = z.new_zeros(())
    for v in probes:
        u = latent @ v.to(latent.dtype).T  # (B, out)
        (hu,) = torch.autograd.grad(gz, z, grad_outputs=u, retain_graph=True, create_graph=create_graph)
        total = total + (hu * u).sum()
    return total / probes.shape[0]


def outspace_estimator(reg: Any, model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, loss: Tensor,
                        generator: torch.Generator | None) -> FamTerm:
    why = _applicable(reg, model, x, loss_fn)
    if why is not None:
        return _fallback("outspace", why, reg, model, x, y, loss_fn, loss, generator)
    net = unwrap(model)
    taps = attach_taps(net)
    latent, z, logits, recomputed = _forward_pieces(net, taps, x)
    if recomputed:  # the given loss does not depend on the recomputed z
        loss = loss_fn(logits, y)
    weight = net.decodeL.weight
    probes = rademacher(reg.cfg.samples, weight, generator)
    trace = outspace_quadratic_form(z, latent, loss, probes, create_graph=reg.cfg.gradient == "full")
    taps.clear()
    return _finish(reg, weight, trace)


def exact_trace_per_sample(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Exact Tr(H) of decodeL's weight for each sample's own loss, (B,), by the output-space factorisation.

    For one sample z = W l + b, so H_W = (l l^T) (x) H_z and Tr(H_W) = ||l||^2 Tr(H_z), where H_z is the
    64 x 64 Hessian of that sample's loss in decodeL's output. Only features with z_o > 0 pass the ReLU
    after decodeL, so only those diagonal entries can be non-zero: one double backward through the
    decoder per active feature instead of 512 Hessian-vector products in weight space. The batch loss
    is a mean of per-sample losses (no cross-sample coupling), so the batch's Tr(H) is the mean of these.
    Nothing here builds a graph for the caller (a measurement, not a penalty).
    """
    net = unwrap(model)
    with torch.no_grad():
        latent = net.encode(x)
    out = []
    for n in range(x.shape[0]):
        ln = latent[n : n + 1]
        z = net.decodeL(ln).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(net.decode_features(z), y[n : n + 1])
            (g,) = torch.autograd.grad(loss, z, create_graph=True)
            active = torch.nonzero(z[0] > 0).flatten().tolist()
            diag = z.new_zeros(())
            for i, o in enumerate(active):
                (h,) = torch.autograd.grad(g[0, o], z, retain_graph=i + 1 < len(active))
                diag = diag + h[0, o]
        out.append(diag.detach() * ln.pow(2).sum())
    return torch.stack(out)


def prepare_taps(model: nn.Module) -> None:
    """Attach the taps where the estimators can apply (a SkullAutoEncoder); other models use autograd."""
    net = unwrap(model)
    if isinstance(getattr(net, "decodeL", None), nn.Module) and isinstance(getattr(net, "decoder", None), nn.Module):
        attach_taps(net)


__all__ = [
    "FD_EPS",
    "autograd_estimator",
    "fd_estimator",
    "outspace_estimator",
    "prepare_taps",
    "attach_taps",
    "detach_taps",
    "fd_quadratic_form",
    "outspace_quadratic_form",
    "exact_trace_per_sample",
]
