"""Cost of one training step for every method and FAM mode, as a ratio to today's plain Dice+Adam step.

A benchmark, not a test. Every method runs the trainer's own ``skullrec.training.trainer.train_step`` on its
own copy of the same model (same initial weights, same batch). The reference row ``plain-eager`` is the
plain step as it was before the speed switches (float32, eager, for-loop Adam); the rows ``plain`` and
``fam-default`` are what the trainer runs by default for a paper-protocol run (``--protocol-steps``):
``train.amp`` and ``train.compile`` resolved and applied by the trainer's own functions
(skullrec.training.speed), the compile trial step included. Other ``plain-*`` / ``fam-*`` rows take
one switch at a time (bf16, torch.compile, channels-last 3D, fused Adam); rows without a suffix
(fam-autograd, sam, ...) are the float32 eager step of that method, as in earlier tables.
Timing: the methods take turns, one
step each per round (round-robin), so a change of machine load during the run hits all of them alike;
the table gives the median over ``--steps`` rounds, as a ratio to the median plain-eager step, the ratio
of the fastest steps (what an unloaded machine approaches) and the ratio of process CPU time (both
more robust than the median on a machine shared with other jobs). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` per method; on CPU (where tracemalloc does not see torch's
allocations) a fresh subprocess per method reports its peak resident set size (VmHWM, the value
``resource.getrusage(...).ru_maxrss`` reports, reset after setup through /proc/self/clear_refs so
that the imports' peak does not hide the step's) and its growth over the state after setup.

    python benchmarks/step_cost.py --threads 2 --batch 4 --steps 10            # CPU (and GPU if present)
    python benchmarks/step_cost.py --threads 1 --steps 20 --no-memory \
        --methods plain-eager,plain,fam-default,plain-bf16,plain-compiled,fam-default-eager   # the issue-14 table
    python benchmarks/step_cost.py --device cuda --steps 20 --no-memory-subprocess
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# name -> (train.method, FamConfig overrides, description[, step options]). "every4" is timed per cycle of 4 steps.
# Step options: amp / compile ("default": the trainer's resolved default; else the value given),
# channels_last (model and batch in channels_last_3d), fused (torch.optim.Adam(fused=True)).
# Without options: float32, eager, the trainer's Adam (the step before the speed switches).
DEFAULT = {"amp": "default", "compile": "default"}
REFERENCE = "plain-eager"  # the row every ratio refers to
METHODS: dict[str, tuple[Any, ...]] = {
    "plain-eager": ("baseline", {}, "reference: Dice + Adam, float32, eager (the plain step before issue 14)"),
    "plain": ("baseline", {}, "Dice + Adam as the trainer runs it by default", DEFAULT),
    "fam-default": ("fam", {}, "FAM defaults (fd-quarter) as the trainer runs it by default", DEFAULT),
    "plain-bf16": ("baseline", {}, "Dice + Adam, bf16 autocast, eager", {"amp": "bf16"}),
    "plain-compiled": ("baseline", {}, "Dice + Adam, float32, torch.compile", {"compile": True}),
    "plain-bf16-compiled": ("baseline", {}, "Dice + Adam, bf16 autocast, torch.compile", {"amp": "bf16", "compile": True}),
    "plain-channels-last": ("baseline", {}, "Dice + Adam, float32, channels_last_3d", {"channels_last": True}),
    "plain-bf16-channels-last": ("baseline", {}, "Dice + Adam, bf16, channels_last_3d", {"amp": "bf16", "channels_last": True}),
    "plain-fused-adam": ("baseline", {}, "Dice + Adam(fused=True), float32, eager", {"fused": True}),
    "fam-default-eager": ("fam", {}, "FAM defaults (fd-quarter), float32, eager (the default before issue 14)"),
    "fam-default-bf16": ("fam", {}, "FAM defaults, bf16 autocast (fd passes in float32), eager", {"amp": "bf16"}),
    "fam-default-compiled": ("fam", {}, "FAM defaults, float32, torch.compile", {"compile": True}),
    "fam-autograd": ("fam", {"estimator": "autograd"}, "FAM full gradient, plain autograd (third-order backward)"),
    "fam-detached": ("fam", {"estimator": "autograd", "gradient": "detached"}, "FAM, trace detached (authors' code)"),
    "fam-every4": ("fam", {"estimator": "autograd", "every": 4}, "FAM autograd every 4th step (mean per step)"),
    "fam-k4-loop": ("fam", {"estimator": "autograd", "samples": 4, "_batched": False}, "4 probes, Python loop"),
    "fam-k4-vmap": ("fam", {"estimator": "autograd", "samples": 4, "_batched": True}, "4 probes, is_grads_batched"),
    "fam-outspace": ("fam", {"estimator": "outspace"}, "exact, autograd in decodeL's output space"),
    "fam-fd": ("fam", {"estimator": "fd"}, "frozen-kink second difference, whole batch"),
    "fam-fd-half": ("fam", {"estimator": "fd-half"}, "frozen-kink second difference, random half batch"),
    "fam-fd-quarter": ("fam", {"estimator": "fd-quarter"}, "frozen-kink second difference, random quarter batch"),
    "fam-fd-k4": ("fam", {"estimator": "fd", "samples": 4}, "fd, 4 probes stacked in one pass"),
    "fam-fd-half-every2": ("fam", {"estimator": "fd-half", "every": 2}, "fd-half every 2nd step"),
    "fam-fd-detached": ("fam", {"estimator": "fd", "gradient": "detached"}, "fd, trace detached"),
    "sam": ("sam", {}, "SAM (two forward/backward passes)"),
    "asam": ("asam", {}, "ASAM"),
    "lookbehind": ("lookbehind", {}, "Lookbehind-SAM, k = 2 (three forward/backward passes, two Adam steps)"),
}


@dataclass
class Runner:
    """One method's model, optimizer and step function."""

    name: str
    step: Any
    cycle: int = 1
    mode: str = "float32, eager"  # what the step ran as (speed.describe)
    setup_s: float = 0.0  # building + compile trial + warm-up steps, seconds
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None


def make_batch(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A skull-like pair: a thick spherical shell (complete) and the same with a box cut out (defective)."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    xs, ys = [], []
    for _ in range(batch):
        c = (torch.rand(3, generator=g) - 0.5) * 0.2
        r = 0.6 + 0.1 * torch.rand((), generator=g)
        d = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 * 1.2 + (zz - c[2]) ** 2 * 0.9).sqrt()
        shell = ((d > r) & (d < r + 0.12)).float()
        cut = shell.clone()
        cut[: size // 3, size // 3 : 2 * size // 3, size // 2 :] = 0
        xs.append(cut)
        ys.append(shell)
    return torch.stack(xs)[:, None].to(device), torch.stack(ys)[:, None].to(device)


def build_runner(name: str, size: int, batch: int, device: torch.device, seed: int = 0, protocol_steps: int = 5000) -> Runner:
    """The step closure of one method (its own model and optimizer, same initial weights).

    The default rows resolve train.amp / train.compile exactly as the trainer's ``_start`` does for a run
    of ``protocol_steps`` steps (skullrec.training.speed), including the compile trial step.
    """
    from skullrec.config import Config, FamConfig, ModelConfig
    from skullrec.flatness import hessian as flatness
    from skullrec.flatness.regularizer import FamRegularizer
    from skullrec.nets.autoencoder import build_model, loss_function
    from skullrec.training import speed
    from skullrec.training.trainer import make_optimizer, train_step

    t_setup = time.perf_counter()
    method, fam_over, _, *rest = METHODS[name]
    opts = {"amp": "none", "compile": False, "channels_last": False, "fused": False, **(rest[0] if rest else {})}
    fam_over = dict(fam_over)
    batched = fam_over.pop("_batched", None)
    cfg = Config()
    cfg.model = ModelConfig(size=size)
    cfg.train.method = method
    cfg.train.batch_size = batch
    cfg.fam = FamConfig(**{**{"lam": 0.002}, **fam_over})
    model = build_model(cfg.model, seed=seed).to(device)
    model.train()
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True) if opts["fused"] else make_optimizer(cfg, model)
    except ImportError as exc:  # e.g. skullrec.training.sam not there yet
        r = Runner(name, None)
        r.error = f"unavailable ({exc})"
        return r
    loss_fn = loss_function()
    reg = FamRegularizer(cfg.fam, model) if method == "fam" else None
    if rest and rest[0] is DEFAULT and reg is None:
        FamRegularizer(cfg.fam, model)  # as the trainer: built for every method (taps attached), used by FAM only
    x, y = make_batch(batch, size, device, seed)
    if opts["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    amp = speed.resolve_amp(cfg.train.amp, device) if opts["amp"] == "default" else opts["amp"]
    twice = speed.needs_double_backward(cfg)
    want = speed.resolve_compile(cfg.train.compile if opts["compile"] == "default" else opts["compile"], device, protocol_steps, False, twice)
    net, compiled = speed.prepare(model, bool(want), amp, (x, y), loss_fn)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    sam = method in ("sam", "asam", "lookbehind")
    every = cfg.fam.every
    counter = [0]

    def step() -> None:
        old = flatness.BATCHED_PROBES
        if batched is not None:
            flatness.BATCHED_PROBES = batched
        try:
            use = reg is not None and counter[0] % every == 0
            counter[0] += 1
            train_step(net, x, y, loss_fn, opt, reg=reg if use else None, lam=cfg.fam.lam, sam=sam, generator=gen, amp=amp)
        finally:
            flatness.BATCHED_PROBES = old

    r = Runner(name, step, cycle=every, mode=speed.describe(amp, compiled))
    r.setup_s = time.perf_counter() - t_setup
    return r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(names: list[str], size: int, batch: int, steps: int, device: torch.device, warmup: int = 2,
                 protocol_steps: int = 5000) -> dict[str, Runner]:
    """Round-robin timing: each round runs one step (one cycle for every-k) of every method.

    Before timing, each method runs ``warmup`` steps (cycles), timed into its ``setup_s`` with its
    construction and compile trial: the one-off cost that a compiled step amortises.
    """
    runners = {n: build_runner(n, size, batch, device, protocol_steps=protocol_steps) for n in names}
    for r in runners.values():
        if r.error:
            continue
        t = time.perf_counter()
        try:
            for _ in range(warmup * r.cycle):
                r.step()
        except Exception as exc:  # a mode that crashes (e.g. is_grads_batched + GroupNorm) is reported, not fatal
            r.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        r.setup_s += time.perf_counter() - t
    for _ in range(steps):
        for r in runners.values():
            if r.error:
                continue
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            try:
                for _ in range(r.cycle):
                    r.step()
            except Exception as exc:
                r.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                continue
            _sync(device)
            r.times.append((time.perf_counter() - t) / r.cycle)
            r.cpu.append((time.process_time() - c) / r.cycle)
    return runners


def _maxrss_mb() -> float:
    """Peak resident set size of this process so far, MB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0: write 5 to clear_refs), so the imports' peak does not hide the step's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(name: str, size: int, batch: int, device: str, steps: int) -> dict[str, float]:
    """Run in a fresh process: peak-RSS growth (CPU) or peak allocated (CUDA) over ``steps`` steps."""
    dev = torch.device(device)
    r = build_runner(name, size, batch, dev)
    if r.error:
        return {"error": r.error}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        import gc

        gc.collect()
        _reset_peak_rss()
        base = _maxrss_mb()
    try:
        for _ in range(steps * r.cycle):
            r.step()
    except Exception as exc:
        return {"error": f"failed: {type(exc).__name__}"}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return {"peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20, "delta_mb": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
    peak = _maxrss_mb()
    return {"peak_mb": peak, "delta_mb": peak - base}


def memory_all(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Peak memory per method: one subprocess each (CPU), or in-process with peak-stat resets (CUDA)."""
    out = {}
    for n in names:
        if device.type == "cuda" and not args.memory_subprocess:
            out[n] = memory_child(n, args.size, args.batch, str(device), args.memory_steps)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", n, "--size", str(args.size), "--batch", str(args.batch),
               "--device", str(device), "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            out[n] = json.loads(line[-1]) if line else {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:80]}
        except subprocess.TimeoutExpired:
            out[n] = {"error": "timeout"}
    return out


def table(runners: dict[str, Runner], memory: dict[str, dict[str, float]], device: torch.device, args: argparse.Namespace) -> str:
    """The Markdown table of one device."""
    ref = runners[REFERENCE]
    base = statistics.median(ref.times)
    base_cpu = statistics.median(ref.cpu)
    lines = [
        f"device {device} ({_device_name(device)}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, {args.size}^3, medians of {args.steps} round-robin steps; {REFERENCE} step {base * 1e3:.1f} ms; "
        f"default rows resolved for a run of {args.protocol_steps} steps",
        "",
        f"| method | what | runs as | setup + {args.warmup} warm-up steps, s | ms / step | x {REFERENCE} (wall) | x {REFERENCE} (fastest) "
        f"| x {REFERENCE} (CPU time) | peak memory MB | step memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in runners.items():
        desc = METHODS[n][2]
        mem = memory.get(n, {})
        mem_s = ("%.0f" % mem["peak_mb"], "%.0f" % mem["delta_mb"]) if "peak_mb" in mem else (mem.get("error", "-"), "-")
        if r.error or not r.times:
            lines.append(f"| {n} | {desc} | {r.mode} | - | {r.error or 'no data'} | - | - | - | {mem_s[0]} | {mem_s[1]} |")
            continue
        t = statistics.median(r.times)
        cpu = statistics.median(r.cpu) / base_cpu if device.type == "cpu" else float("nan")
        cpu_s = f"{cpu:.2f}" if device.type == "cpu" else "-"
        fastest = min(r.times) / min(ref.times)
        lines.append(f"| {n} | {desc} | {r.mode} | {r.setup_s:.1f} | {t * 1e3:.1f} | {t / base:.2f} | {fastest:.2f} | {cpu_s} "
                     f"| {mem_s[0]} | {mem_s[1]} |")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="all", help="cpu, cuda, or all (CPU, then CUDA when present)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the rounds (compile happens here)")
    p.add_argument("--protocol-steps", type=int, default=5000,
                   help="the run length the default rows resolve train.compile for (paper protocol: 4,000-5,000 steps)")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--no-memory-subprocess", dest="memory_subprocess", action="store_false", help="CUDA: measure in-process")
    p.add_argument("--child-timeout", type=float, default=300)
    p.add_argument("--json", help="also write the raw timings here")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.size, args.batch, args.device, args.memory_steps)), flush=True)
        return 0
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}[args.device]
    raw = {}
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        runners = time_methods(names, args.size, args.batch, args.steps, dev, warmup=args.warmup, protocol_steps=args.protocol_steps)
        load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        for r in runners.values():  # free the timed models before measuring memory (in-process on CUDA)
            r.step = None
        import gc

        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        memory = memory_all(names, args, dev) if args.memory else {}
        print(f"\n## step cost on {d} (load average 1/5/15 min at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
              f"at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; {os.cpu_count()} CPUs)\n", flush=True)
        print(table(runners, memory, dev, args), flush=True)
        raw[d] = {n: {"times": r.times, "cpu": r.cpu, "error": r.error, "memory": memory.get(n), "mode": r.mode, "setup_s": r.setup_s}
                  for n, r in runners.items()}
    if args.json:
        with contextlib.suppress(OSError):
            with open(args.json, "w") as fh:
                json.dump(raw, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
