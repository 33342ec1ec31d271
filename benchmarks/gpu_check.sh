#!/usr/bin/env bash
# One short, offline GPU session (issue 6): correctness on CUDA, step cost of every method, a short
# training extrapolated to the paper protocol. Prints one report and writes it to $OUT/gpu_check.txt
# when $OUT is set. Total runtime at most GPU_CHECK_BUDGET (default 360 s) plus the wheel install (<= 60 s)
# (each stage has its own timeout; a failed or timed-out stage is reported and the next one still runs;
# expected on one H100: about 3-4 minutes).
#
# The GPU machine has torch (and numpy, scipy, scikit-image, pyyaml, typer, rich, tqdm, safetensors)
# but not monai or nibabel and reaches no package index: they come as wheels from .whl/ in the repo
# root (git-ignored, so pass it along, e.g. run(..., carry=[".whl"])). Prepare them on a connected
# machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl monai==1.6.1 nibabel
# SimpleITK (a 50 MB wheel) is only needed to read NRRD files, which this check never does: when it is
# missing, a stub module that fails on first use is put at the end of the path so that `import
# skullrec.io` works.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
# Dry run of the script's logic on a CPU (small and slow, no timing value):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_CASES=8 GPU_CHECK_EPOCHS=2 GPU_CHECK_STEPS=1 bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=/tmp/skullrec-site
STUBS=/tmp/skullrec-stubs
REPORT=${OUT:-/tmp}/gpu_check.txt
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"
exec > >(tee -a "$REPORT") 2>&1

echo "# skullrec GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"

if compgen -G ".whl/*.whl" > /dev/null; then
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
else
  echo "no wheels in .whl/ (monai/nibabel must already be importable)"
fi
mkdir -p "$STUBS"
if ! PYTHONPATH="$SITE" "$PY" -c "import SimpleITK" 2>/dev/null; then
  cat > "$STUBS/SimpleITK.py" <<'EOF'
"""Stub put in place by benchmarks/gpu_check.sh: SimpleITK is absent on this machine (only NRRD reading needs it)."""
def __getattr__(name):
    raise ImportError(f"SimpleITK is not installed here (stub from gpu_check.sh); SimpleITK.{name} unavailable")
EOF
fi
export PYTHONPATH="$SITE:$PWD:$STUBS"
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-cuda} GPU_CHECK_CASES=${GPU_CHECK_CASES:-100} GPU_CHECK_EPOCHS=${GPU_CHECK_EPOCHS:-4}
STEPS=${GPU_CHECK_STEPS:-20}
"$PY" -c "import torch, monai, nibabel; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__, 'nibabel', nibabel.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

# All stages together stay within GPU_CHECK_BUDGET seconds (default 360 = 6 min): each stage gets
# its own limit or what is left of the budget, whichever is smaller.
BUDGET=${GPU_CHECK_BUDGET:-360}
stage() {  # stage NAME TIMEOUT CMD...: run, report failure or timeout, never abort the script
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then echo; echo "## $name"; echo "!! skipped: the ${BUDGET} s budget is used up"; return 0; fi
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo; echo "## $name"; local t0=$SECONDS rc=0
  timeout "$limit" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then echo "!! stage '$name' failed (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out after '"$limit"' s'))"; fi
  echo "(stage '$name': $((SECONDS - t0)) s)"
}

# ---------------------------------------------------------------------------------------------
stage "correctness on $GPU_CHECK_DEVICE" 100 "$PY" - <<'EOF'
import torch
from skullrec.config import FamConfig, ModelConfig
from skullrec.flatness.hessian import rademacher
from skullrec.flatness.regularizer import FamRegularizer
from skullrec.nets.autoencoder import build_model, loss_function
import os
import skullrec.flatness.fast as ff

dev = torch.device(os.environ["GPU_CHECK_DEVICE"])
amp_dev = dev.type
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
rows = []

def setup(cfg, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = build_model(cfg, seed=seed).to(dev, dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dev, dtype))
    s = cfg.size
    x = (torch.rand(batch, 1, s, s, s, generator=g) > 0.6).to(dev, dtype)
    y = ((torch.rand(batch, 1, s, s, s, generator=g) > 0.6) | (x.cpu() > 0)).to(dev, dtype)
    return m, x, y

def penalty(m, x, y, est, seed=1, amp=False):
    reg = FamRegularizer(FamConfig(lam=1.0, estimator=est, trace="signed"), m)
    ff.attach_taps(m)
    with torch.autocast(amp_dev, dtype=torch.bfloat16, enabled=amp):
        logits = m(x)
        loss = loss_function()(logits.float() if amp else logits, y)  # keep float64 where the model is
        return reg(m, x, y, loss_function(), loss, torch.Generator(device=dev).manual_seed(seed))

def flat(m, t):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(t, list(m.parameters()))])

SMALL = ModelConfig(size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 2], latent_size=8)
# 1. FAM full gradient (plain autograd, third-order backward on cuda) vs central finite differences, float64.
m, x, y = setup(SMALL, 2, torch.float64)
gvec = flat(m, penalty(m, x, y, "autograd").penalty)
d = torch.randn(gvec.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dev)
d /= d.norm()
def along(h):
    with torch.no_grad():
        i = 0
        for p in m.parameters():
            p.add_(h * d[i:i + p.numel()].view_as(p)); i += p.numel()
    v = float(penalty(m, x, y, "autograd").penalty.detach())
    with torch.no_grad():
        i = 0
        for p in m.parameters():
            p.sub_(h * d[i:i + p.numel()].view_as(p)); i += p.numel()
    return v
h = 1e-7  # small: a larger step crosses PReLU kinks, where the derivative of the penalty jumps
fd_dir = (along(h) - along(-h)) / (2 * h)
an_dir = float(gvec @ d)
rows.append(("autograd FAM gradient vs central FD, float64", f"{an_dir:.6g} vs {fd_dir:.6g}", f"rel err {abs(an_dir - fd_dir) / abs(fd_dir):.1e}"))
# 2. fast estimators vs autograd, same probes: value and full gradient.
for dtype, cfg, b, name in ((torch.float64, SMALL, 2, "float64 32^3"), (torch.float32, ModelConfig(), 4, "float32 64^3")):
    m, x, y = setup(cfg, b, dtype)
    ref = penalty(m, x, y, "autograd"); gref = flat(m, ref.penalty)
    for est in ("outspace", "fd", "fd-half"):
        t = penalty(m, x, y, est); g = flat(m, t.penalty)
        if est == "fd-half":  # a subset: compare its value only against the batch's
            rows.append((f"{est} ({name})", f"trace {float(t.trace):.5g} vs batch {float(ref.trace):.5g}", "subset of the batch (unbiased over subsets)"))
            continue
        rel_v = abs(float(t.trace - ref.trace)) / abs(float(ref.trace))
        rel_g = float((g - gref).norm() / gref.norm())
        rows.append((f"{est} vs autograd ({name})", f"trace rel err {rel_v:.1e}", f"gradient rel err {rel_g:.1e}"))
# 3. bf16 autocast: plain-autograd FAM gradient vs float32 on cuda.
m, x, y = setup(SMALL, 2, torch.float32)
g32 = flat(m, penalty(m, x, y, "autograd").penalty)
g16 = flat(m, penalty(m, x, y, "autograd", amp=True).penalty)
rows.append(("bf16 autocast, autograd FAM gradient vs float32", f"cosine {float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)):.4f}", f"rel err {float((g16 - g32).norm() / g32.norm()):.1e}"))
print("| check | value | error |\n|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF

# ---------------------------------------------------------------------------------------------
stage "step cost on $GPU_CHECK_DEVICE (batch 4, 64^3)" 150 "$PY" benchmarks/step_cost.py --device "$GPU_CHECK_DEVICE" --batch 4 --steps "$STEPS" --no-memory-subprocess

# ---------------------------------------------------------------------------------------------
stage "short training on $GPU_CHECK_DEVICE, extrapolated to 100 skulls x 200 epochs" 120 "$PY" - <<'EOF'
import os, statistics, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from step_cost import make_batch
from skullrec.config import Config, FamConfig, ModelConfig, dump_config
from skullrec.data.cache import TensorSplit, TrainingData
from skullrec.io import atomic_write_text
from skullrec.training.run_dir import CONFIG_FILE
from skullrec.training.trainer import train

dev = torch.device(os.environ["GPU_CHECK_DEVICE"])
N, EPOCHS = int(os.environ["GPU_CHECK_CASES"]), int(os.environ["GPU_CHECK_EPOCHS"])
xs, ys = [], []
for i in range(0, N, 4):  # N skull-like shells with box defects, on the device as uint8 (like skullrec.data.cache)
    x, y = make_batch(min(4, N - i), 64, torch.device("cpu"), seed=i)
    xs.append(x); ys.append(y)
x = torch.cat(xs).to(torch.uint8).to(dev); y = torch.cat(ys).to(torch.uint8).to(dev)
data = TrainingData(train=TensorSplit("train", [f"{i:03d}" for i in range(N)], x, y), evals={})
print(f"{N} cases, batch 4, {EPOCHS} epochs per row; 200 epochs x (median s/epoch of epochs 2-{EPOCHS}) * 100 / {N}")
print("| method | estimator | deterministic | s / epoch | x 200 epochs, 100 cases | target (GPU) |")
print("|---|---|---|---|---|---|")
for method, est, det in (("baseline", "-", False), ("fam", Config().fam.estimator, False), ("fam", "fd", False), ("fam", "autograd", False), ("fam", Config().fam.estimator, True)):
    cfg = Config()
    cfg.name = f"gpu-{method}-{est}"
    cfg.model = ModelConfig()
    cfg.train.method, cfg.train.epochs, cfg.train.batch_size = method, EPOCHS, 4
    cfg.train.val_every, cfg.train.checkpoint_epochs, cfg.train.deterministic = 0, [EPOCHS], det
    cfg.fam = FamConfig(lam=0.002 if method == "fam" else 0.0, estimator=est if est != "-" else Config().fam.estimator)
    run = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    atomic_write_text(run / CONFIG_FILE, dump_config(cfg))
    secs = []
    t0 = time.perf_counter()
    train(cfg, run, device=dev, data=data, progress=False, log=lambda s, secs=secs: secs.append(float(s.rsplit(" ", 2)[-2])) if s.startswith("epoch") else None)
    per = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    total = 200 * per * 100 / N
    print(f"| {method} | {est} | {det} | {per:.2f} | {total:.0f} s | {'<= 120 s: met' if total <= 120 else '> 120 s: missed'} |", flush=True)
EOF

# ---------------------------------------------------------------------------------------------
# skullrec experiment --jobs J trains J runs at once on one GPU (separate processes): throughput of J
# concurrent FAM trainings (2 epochs of the cases each) against one alone.
# (a file, not stdin: the spawned processes import the job function from it)
cat > /tmp/skullrec-concurrent.py <<'EOF'
import os, sys, time
import torch.multiprocessing as mp

def job(rank, n_cases, q):
    import torch
    sys.path.insert(0, "benchmarks")
    from step_cost import build_runner
    torch.set_num_threads(1)
    # eager: "fam-default" now compiles, a ~50 s warm-up in every spawned process that would swamp this short concurrency check
    r = build_runner("fam-default-eager", 64, 4, torch.device(os.environ["GPU_CHECK_DEVICE"]), seed=rank)
    r.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    steps = 2 * n_cases // 4  # two epochs of n_cases at batch 4
    t = time.perf_counter()
    for _ in range(steps):
        r.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    q.put((steps, time.perf_counter() - t))

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    n = int(os.environ["GPU_CHECK_CASES"])
    print("| concurrent runs | steps/s per run | steps/s total | x one run |\n|---|---|---|---|")
    base = None
    for jobs in (1, 2, 4):
        q = ctx.Queue()
        ps = [ctx.Process(target=job, args=(i, n, q)) for i in range(jobs)]
        for p in ps:
            p.start()
        res = [q.get(timeout=120) for _ in ps]
        for p in ps:
            p.join()
        per = sum(s / t for s, t in res) / jobs
        total = per * jobs
        base = base or total
        print(f"| {jobs} | {per:.1f} | {total:.1f} | {total / base:.2f} |", flush=True)
EOF
stage "concurrent runs on one $GPU_CHECK_DEVICE (skullrec experiment --jobs)" 100 "$PY" /tmp/skullrec-concurrent.py

echo; echo "report: $REPORT"
