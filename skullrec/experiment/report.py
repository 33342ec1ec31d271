"""The experiment's tables and figures: Table 2 (mean ± 95 % CI over seeds), differences to the baseline, plots."""

from __future__ import annotations

import io as _io
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ExperimentConfig
from ..io import atomic_write_bytes
from ..training.run_dir import METRICS_FILE, read_metrics


def _t975(n: int) -> float:
    """Two-sided 95 % Student-t quantile for n - 1 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


METRICS = (("dsc", "DSC"), ("hd_mm", "HD (mm)"), ("hd95_mm", "HD95 (mm)"))


def _rows_by_seed(rows: list[dict]) -> dict[tuple, dict[int, list[dict]]]:
    """Per-case rows grouped as (target, method, set, epoch) -> seed -> rows."""
    out: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault((r.get("target", "skull"), r["method"], r["set"], r["epoch"]), {}).setdefault(r["seed"], []).append(r)
    return out


def _mean_ci95(per_seed: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval of per-seed values (NaN for one seed)."""
    v = np.asarray(per_seed, dtype=np.float64)
    ci = _t975(len(v)) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), ci


def table2(rows: list[dict], collapse: list[dict], exp: ExperimentConfig) -> list[dict]:
    """Aggregate per-case rows into Table 2: per target, method, set, epoch: mean ± 95 % CI over seeds."""
    methods = exp.row_methods()
    flags = {}
    for c in collapse:
        flags.setdefault((c["method"], c["epoch"], c["set"]), []).append(c["pairwise_dsc"])
    by_seed = _rows_by_seed(rows)
    table = []
    for target, method, split, epoch in itertools.product(exp.targets, methods, exp.eval_splits, exp.checkpoint_epochs):
        per_seed = by_seed.get((target, method, split, epoch))
        if not per_seed:
            continue
        entry: dict[str, Any] = {"target": target, "method": method, "set": split, "epoch": epoch}
        seeds = sorted(per_seed)
        for key, _ in METRICS:
            entry[key], entry[f"{key}_ci95"] = _mean_ci95([np.mean([r[key] for r in per_seed[s]]) for s in seeds])
        entry["seeds"] = len(seeds)
        entry["cases"] = sum(len(v) for v in per_seed.values()) // len(seeds)
        entry["failed"] = sum(bool(r.get("failed")) for v in per_seed.values() for r in v)
        pw = flags.get((method, epoch, split), [float("nan")])
        entry["pairwise_dsc"] = float(np.mean(pw))
        entry["collapsed"] = bool(entry["pairwise_dsc"] > exp.collapse_threshold)
        table.append(entry)
    # How far each row is above the input-independent mean shape (same target, set, epoch).
    base = {(e["target"], e["set"], e["epoch"]): e["dsc"] for e in table if e["method"] == "ref:mean_shape"}
    for e in table:
        key = (e["target"], e["set"], e["epoch"])
        if key in base:
            e["dsc_minus_mean_shape"] = e["dsc"] - base[key]
    return table


def _fmt(mean: float, ci: float, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")


TARGET_TITLES = {
    "skull": "target skull: reconstructed complete skull vs true complete skull (the paper's scores)",
    "implant": "target implant: the implant skullrec predict writes (reconstruction AND NOT defective, islands < 100 mm³ removed) vs true implant (AutoImplant's scores)",
}


def versus_reference(rows: list[dict], exp: ExperimentConfig) -> list[dict]:
    """Each method minus the reference method, paired by seed: mean and 95 % t-interval of the per-seed
    differences of the mean score over cases, per target, set and epoch.

    Pairing by seed is what makes "method beats baseline" testable with three seeds: runs with the
    same seed start from the same weights and see the same batches, so the seed-to-seed spread
    that both share cancels out of the difference.
    """
    if exp.reference is None:
        return []
    by_seed = _rows_by_seed(rows)
    out = []
    for target, spec, split, epoch in itertools.product(exp.targets, exp.methods, exp.eval_splits, exp.checkpoint_epochs):
        if spec.name == exp.reference:
            continue
        mine = by_seed.get((target, spec.name, split, epoch), {})
        ref = by_seed.get((target, exp.reference, split, epoch), {})
        seeds = [s for s in exp.seeds if s in mine and s in ref]
        if not seeds:
            continue
        entry: dict[str, Any] = {"target": target, "method": spec.name, "reference": exp.reference, "set": split, "epoch": epoch}
        # Paired by case as well: with one seed the seed interval does not exist, and the case interval says how
        # much of a difference the 20-odd evaluation cases can resolve (test-set noise, not seed-to-seed noise).
        mine_case = {(s, r["case"]): r for s in seeds for r in mine[s]}
        ref_case = {(s, r["case"]): r for s in seeds for r in ref[s]}
        cases = sorted({c for (_, c) in mine_case} & {c for (_, c) in ref_case})
        for key, _ in METRICS:
            entry[f"d_{key}"], entry[f"d_{key}_ci95"] = _mean_ci95(
                [np.mean([r[key] for r in mine[s]]) - np.mean([r[key] for r in ref[s]]) for s in seeds]
            )
            per_case = [np.mean([mine_case[(s, c)][key] - ref_case[(s, c)][key] for s in seeds
                                 if (s, c) in mine_case and (s, c) in ref_case]) for c in cases]
            entry[f"d_{key}_case_ci95"] = _mean_ci95(per_case)[1] if per_case else float("nan")
        entry["seeds"] = len(seeds)
        entry["cases"] = len(cases)
        out.append(entry)
    return out


def versus_reference_markdown(diffs: list[dict], exp: ExperimentConfig) -> str:
    """The seed-paired differences to the reference method as markdown, one table per target."""
    lines = [f"Method minus {exp.reference}, paired by seed: mean ± 95 % CI of the per-seed differences "
             "(DSC: positive is better; HD, HD95: negative is better); `*` = the interval excludes 0. "
             "The last two columns: the same differences paired by case (t-interval over the cases of the "
             "seed-averaged per-case differences: test-set noise only, the only interval one seed allows)"]

    def cell(m: float, ci: float, digits: int) -> str:
        star = "*" if not math.isnan(ci) and abs(m) > ci else ""
        return f"{m:+.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}") + star

    for target in exp.targets:
        lines += ["", f"**{TARGET_TITLES[target]}**", "",
                  "| method | set | epoch | ΔDSC | ΔHD (mm) | ΔHD95 (mm) | seeds | ΔDSC, by case | ΔHD95 (mm), by case | cases |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in (e for e in diffs if e["target"] == target):
            cells = [cell(e[f"d_{key}"], e[f"d_{key}_ci95"], digits) for key, digits in (("dsc", 3), ("hd_mm", 1), ("hd95_mm", 1))]
            by_case = [cell(e[f"d_{key}"], e.get(f"d_{key}_case_ci95", float("nan")), digits) for key, digits in (("dsc", 3), ("hd95_mm", 1))]
            lines.append(f"| {e['method']} | {e['set']} | {e['epoch']} | {' | '.join(cells)} | {e['seeds']} | "
                         f"{' | '.join(by_case)} | {e.get('cases', '')} |")
    return "\n".join(lines) + "\n"


def table2_markdown(table: list[dict], exp: ExperimentConfig) -> str:
    """Table 2 as markdown: one table per target."""
    lines = [
        f"DSC / HD / HD95 (HD95 definition: {exp.hd95}) — mean ± 95 % CI over seeds "
        f"(t-interval of per-seed means); `collapsed` = mean pairwise DSC of reconstructions of different cases "
        f"> {exp.collapse_threshold}",
    ]
    vs_mean = any("dsc_minus_mean_shape" in e for e in table)
    if vs_mean:
        lines.append("`DSC − mean shape` = the row's DSC minus that of `ref:mean_shape` (the training skulls' voxel-wise mean, "
                     "one mask for every input) on the same target, set and epoch; `ref:` rows are reference predictors, not models")
    for target in exp.targets:
        lines += [
            "",
            f"**{TARGET_TITLES[target]}**",
            "",
            "| method | set | epoch | DSC | HD (mm) | HD95 (mm) | seeds × cases | failed | pairwise DSC | collapsed |"
            + (" DSC − mean shape |" if vs_mean else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if vs_mean else ""),
        ]
        for e in (e for e in table if e["target"] == target):
            lines.append(
                f"| {e['method']} | {e['set']} | {e['epoch']} | {_fmt(e['dsc'], e['dsc_ci95'], 3)} | "
                f"{_fmt(e['hd_mm'], e['hd_mm_ci95'], 1)} | {_fmt(e['hd95_mm'], e['hd95_mm_ci95'], 1)} | "
                f"{e['seeds']} × {e['cases']} | {e['failed']} | {e['pairwise_dsc']:.3f} | {'YES' if e['collapsed'] else 'no'} |"
                + (f" {e['dsc_minus_mean_shape']:+.3f} |" if "dsc_minus_mean_shape" in e else (" – |" if vs_mean else ""))
            )
    return "\n".join(lines) + "\n"


def _save_fig(fig: Any, path: Path) -> None:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def figures(exp: ExperimentConfig, runs: dict[tuple[str, int], Path], rows: list[dict], out: Path) -> list[Path]:
    """Figure 1 (training Dice-loss curves per method) and Figure 2 (boxplots per method and set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in exp.methods:
        curves = [read_metrics(Path(runs[(spec.name, s)]) / METRICS_FILE) for s in exp.seeds if (spec.name, s) in runs]
        curves = [[m["dice_loss"] for m in c if "dice_loss" in m] for c in curves]
        n = min((len(c) for c in curves), default=0)
        if n == 0:
            continue
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(np.arange(1, n + 1), mean, label=spec.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training Dice loss (mean over seeds)")
    ax.set_title("Figure 1: training Dice loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(out / "fig1_training_loss.png")
    _save_fig(fig, paths[-1])
    plt.close(fig)

    last = max(exp.checkpoint_epochs)
    panels = list(itertools.product(exp.targets, exp.eval_splits))
    fig, axes = plt.subplots(len(panels), len(METRICS), figsize=(4.2 * len(METRICS), 3.6 * len(panels)), squeeze=False)
    names = [m.name for m in exp.methods]
    for i, (target, split) in enumerate(panels):
        for j, (key, label) in enumerate(METRICS):
            data = [[r[key] for r in rows if r.get("target", "skull") == target and r["method"] == n
                     and r["set"] == split and r["epoch"] == last] for n in names]
            axes[i, j].boxplot(data, showfliers=True)
            axes[i, j].set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=8)
            axes[i, j].set_title(f"{target}, {split}: {label} (epoch {last})", fontsize=9)
            axes[i, j].grid(alpha=0.3)
    fig.suptitle("Figure 2: per-case scores, cases pooled over seeds")
    fig.tight_layout()
    paths.append(out / "fig2_boxplots.png")
    _save_fig(fig, paths[-1])
    plt.close(fig)
    return paths


def paired_differences(rows: list[dict], arm: str, baseline: str, *, target: str, split: str, epoch: int, metric: str = "dsc",
                       exclude: frozenset[str] | set[str] = frozenset()) -> tuple[np.ndarray, list[int], list[str]]:
    """``arm - baseline`` per (seed, case), paired by seed and case: (diffs (seeds, cases), seeds, cases).

    Only seeds both methods trained and cases scored for every such seed enter; ``exclude`` drops cases
    (e.g. a held-out skull that duplicates a training skull). Values are read as floats from per-case rows.
    """
    def table(method: str) -> dict[tuple[int, str], float]:
        return {
            (int(r["seed"]), str(r["case"])): float(r[metric])
            for r in rows
            if r["method"] == method and r.get("target", "skull") == target and r["set"] == split and int(r["epoch"]) == int(epoch)
            and str(r["case"]) not in exclude and r[metric] not in ("", None)
        }

    a, b = table(arm), table(baseline)
    seeds = sorted({s for s, _ in a} & {s for s, _ in b})
    cases = sorted({c for _, c in a} & {c for _, c in b})
    cases = [c for c in cases if all((s, c) in a and (s, c) in b and math.isfinite(a[s, c] - b[s, c]) for s in seeds)]
    diffs = np.array([[a[s, c] - b[s, c] for c in cases] for s in seeds], dtype=np.float64)
    return diffs, seeds, cases
