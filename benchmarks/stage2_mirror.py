"""Does mirror test-time augmentation help stage 2? Scores with and without ``--mirror``, paired by case.

    python benchmarks/stage2_mirror.py --eval data/eval-native --kinds skullfix set2 [--cases N] [--out FILE.csv]

EVAL is a folder from ``skullrec prepare-eval`` (KIND/defective, KIND/implant at each skull's own grid).
Per case: stage 1 once, then stage 2 without and with the left-right mirror of its box
(``stage2_implant(mirror=...)``, what ``skullrec predict --mirror`` runs), each implant scored at the
original resolution with ``evaluation.metrics.case_metrics`` (DSC, bDSC, HD95 as ``skullrec evaluate``).
Prints per-kind means, medians, the paired difference with its 95 % t-interval over cases, and the time
stage 2 takes each way; ``--out FILE.csv`` keeps the per-case rows. The weights are the shipped ones
(``SKULLREC_MODELS=DIR`` for others, as ``skullrec predict``).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from skullrec.evaluation.metrics import case_metrics
from skullrec.experiment.report import _mean_ci95
from skullrec.inference.predict import apply_stage2, reconstruct
from skullrec.inference.shipped import shipped_checkpoints
from skullrec.io import list_volumes, read_volume
from skullrec.nets.checkpoint import load_checkpoint, load_implant_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, default=Path("data/eval-native"))
    ap.add_argument("--kinds", nargs="+", default=["skullfix", "set2"])
    ap.add_argument("--cases", type=int, default=None, help="only the first N cases per kind (a dry run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    ckpt1, ckpt2 = shipped_checkpoints()
    model, cfg, _ = load_checkpoint(ckpt1, dev)
    model2, cfg2, _ = load_implant_checkpoint(ckpt2, dev)
    rows = []
    for kind in args.kinds:
        files = list_volumes(args.eval / kind / "defective")
        truths = list_volumes(args.eval / kind / "implant")
        for cid in sorted(files)[: args.cases]:
            vol = read_volume(files[cid])
            truth = read_volume(truths[cid]).data.astype(bool)
            rec = reconstruct(model, [vol], batch_size=1, device=dev, size=cfg.model.size)[0]
            row = {"kind": kind, "case": cid}
            for mirror in (False, True):
                t0 = time.perf_counter()
                out = apply_stage2(rec, vol, model2, cfg2, dev, mirror=mirror)
                secs = time.perf_counter() - t0
                m = case_metrics(out.implant.data.astype(bool), truth, vol.spacing, vol.data.astype(bool), target="implant")
                tag = "mirror" if mirror else "plain"
                row.update({f"{tag}_dsc": m["dsc"], f"{tag}_bdsc": m["bdsc"], f"{tag}_hd95": m["hd95_mm"], f"{tag}_s": secs})
            rows.append(row)
            print(f"{kind} {cid}: DSC {row['plain_dsc']:.3f} -> {row['mirror_dsc']:.3f}  "
                  f"HD95 {row['plain_hd95']:.2f} -> {row['mirror_hd95']:.2f} mm  "
                  f"stage 2 {row['plain_s']:.1f} s -> {row['mirror_s']:.1f} s", flush=True)
    for kind in args.kinds:
        rk = [r for r in rows if r["kind"] == kind]
        if not rk:
            continue
        print(f"\n{kind} ({len(rk)} cases): mean (median) plain -> mirror; paired difference mean ± 95 % t-interval")
        for key in ("dsc", "bdsc", "hd95"):
            a = np.array([r[f"plain_{key}"] for r in rk], dtype=float)
            b = np.array([r[f"mirror_{key}"] for r in rk], dtype=float)
            d = b - a
            _, ci = _mean_ci95(list(d))
            print(f"  {key:5s} {a.mean():.3f} ({np.median(a):.3f}) -> {b.mean():.3f} ({np.median(b):.3f});"
                  f" diff {d.mean():+.4f} ± {ci:.4f}; better in {int((d > 0).sum()) if key != 'hd95' else int((d < 0).sum())}/{len(d)}")
        t_a = np.mean([r["plain_s"] for r in rk])
        t_b = np.mean([r["mirror_s"] for r in rk])
        print(f"  stage 2 per case: {t_a:.2f} s -> {t_b:.2f} s ({t_b / t_a:.2f}x)")
    if args.out is not None:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
