"""How strong each FAM arm is, from the runs' metrics.jsonl: ||w||^2, Tr(H), gradient ratios and penalty per epoch.

Usage: python scripts/fam_trajectories.py RESULTS_DIR [--out FIG.png] [--table TABLE.md]

RESULTS_DIR is an experiment's output folder (``runs/NAME_seedS/metrics.jsonl``). For every arm (runs grouped
by name, seeds averaged) the figure shows, per epoch, the regularised layer's ||w||^2, the Hutchinson Tr(H),
and the FAM gradient's size relative to the Dice gradient over all parameters and over the 64 x 8 layer alone;
the table gives the last epoch's values and the penalty lam * kappa-hat, so the arms can be set beside the
authors' objective (``fam_authors``) on three scales: all-parameter gradient ratio, layer gradient ratio and
penalty value. Baselines have no FAM term: only ||w||^2 is drawn for them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
import warnings
from pathlib import Path

import numpy as np


def _load(results: Path) -> dict[str, list[list[dict]]]:
    arms: dict[str, list[list[dict]]] = defaultdict(list)
    for metrics in sorted(results.glob("runs/*/metrics.jsonl")):
        name = re.sub(r"_seed\d+$", "", metrics.parent.name)
        arms[name].append([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()])
    return dict(arms)


def _series(runs: list[list[dict]], key: str, sub: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the mean over seeds of ``key`` (``key[sub]`` for a dict value); NaN where absent."""
    n = min(len(r) for r in runs)
    vals: list[list[float]] = []
    for r in runs:
        row = []
        for rec in r[:n]:
            v = rec.get(key)
            if isinstance(v, dict):
                v = v.get(sub)
            row.append(np.nan if v is None else float(v))
        vals.append(row)
    arr = np.array(vals)
    with np.errstate(all="ignore"):  # an all-NaN column (no FAM term) stays NaN without a warning
        mean = np.full(arr.shape[1], np.nan) if np.isnan(arr).all() else np.nanmean(arr, axis=0)
    return np.array([rec["epoch"] for rec in runs[0][:n]]), mean


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Mean of empty slice")  # arms without a FAM term: NaN, said in the table
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args(argv)
    arms = _load(args.results)
    lams = {}
    cfg_file = args.results / "experiment.yaml"
    if cfg_file.is_file():
        import yaml

        for m in yaml.safe_load(cfg_file.read_text()).get("methods", []):
            lams[m["name"]] = float(m.get("lam") or 0.0)
    lines = ["| arm | seeds | epochs | ‖w‖² | Tr(H) | κ̂ | λ·κ̂ (penalty) | FAM/Dice gradient, all parameters | FAM/Dice gradient, 64×8 layer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in arms.items():
        last = lambda key, sub=None: _series(runs, key, sub)[1][-10:]  # noqa: E731  (mean of the last 10 epochs)
        ep = _series(runs, "norm_sq")[0]
        kappa = np.nanmean(last("kappa_hat")) if any("kappa_hat" in r[-1] for r in runs) else np.nan
        lines.append(f"| {name} | {len(runs)} | {int(ep[-1]) if len(ep) else 0} | {np.nanmean(last('norm_sq')):.2f} | "
                     f"{np.nanmean(last('trace')) if any(r[-1].get('trace') is not None for r in runs) else float('nan'):.3g} | "
                     f"{kappa:.3g} | {lams.get(name, float('nan')) * kappa:.3g} | "
                     f"{np.nanmean(last('fam_grad_ratio', 'all')) if any('fam_grad_ratio' in r[-1] for r in runs) else float('nan'):.3g} | "
                     f"{np.nanmean(last('fam_grad_ratio', 'decodeL')) if any('fam_grad_ratio' in r[-1] for r in runs) else float('nan'):.3g} |")
    table = "\n".join(lines) + "\n\n(values: mean over seeds of the last 10 logged epochs; NaN where an arm has no FAM term)\n"
    print(table)
    if args.table is not None:
        args.table.write_text(table)
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        colour = {name: f"C{i}" for i, name in enumerate(arms)}  # one colour per arm in every panel
        panels = [("norm_sq", None, "‖w‖² of the 64×8 layer"), ("trace", None, "Tr(H) (Hutchinson)"),
                  ("fam_grad_ratio", "all", "FAM / Dice gradient, all parameters"),
                  ("fam_grad_ratio", "decodeL", "FAM / Dice gradient, 64×8 layer")]
        for ax, (key, sub, title) in zip(axes, panels):
            for name, runs in arms.items():
                ep, v = _series(runs, key, sub)
                if np.isfinite(v).any():
                    ax.plot(ep, v, label=name, color=colour[name])
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if key != "norm_sq":
                ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
