"""Sites: data-set folders in the project's layout, one per hospital, and a non-IID split maker.

A site folder is an ordinary skullrec data set (skullrec.data.layout) with at least a ``train`` split;
``eval_site`` (if present) holds the site's own held-out cases, scored after every round.

:func:`make_sites` turns the complete skulls of one data set into N sites that differ the way
hospitals differ (the setting where flatness is claimed to help):

- different counts: site k gets a share of the skulls proportional to ``weights[k]`` (default 1, 2, ..., N);
- different defect distributions: each skull of site k gets a set-2 defect with probability
  ``set2_fraction[k]`` and a set-1 (SkullFix-like) defect otherwise (default: evenly from 0 at the
  first site to 1 at the last), cut afresh by skullrec.data.defects on the prepared grid.

Everything is drawn from ``seed`` (assignment, defect type, defect shape), so a split is reproducible.
The output folder is written in a staging folder and renamed at the end (nothing half-written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.defects import set1_defect, set2_defect
from ..data.layout import check_output_dir, load_split, splits_in, staged_output, write_case, write_manifest
from ..errors import InputError

SITE_EVAL = "eval_site"


def check_site(root: str | Path, size: int | None = None) -> dict[str, Any]:
    """Check one site folder; returns {name, train cases, eval splits}. A problem is a one-line InputError."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: site folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: site is not a folder")
    if not (root / "train").is_dir():
        found = ", ".join(splits_in(root)) or "none"
        raise InputError(f"{root}: not a site data set (no train/ split; splits found: {found})")
    split = load_split(root, "train")  # InputError for unpaired, unreadable or differently shaped cases
    if len(split) == 0:
        raise InputError(f"{root}/train: no cases")
    shape = split.defective.shape[1:]
    if size is not None and shape != (size, size, size):
        raise InputError(f"{root}/train: volumes are {shape}, the model expects {size}^3; run 'skullrec prepare' first")
    evals = [s for s in splits_in(root) if s != "train"]
    return {"name": root.name, "train": len(split), "evals": evals}


def check_sites(roots: list[str | Path], size: int | None = None) -> list[dict[str, Any]]:
    """Check every site and that their names (folder names, the sites' ids) are distinct."""
    if len(roots) < 2:
        raise InputError(f"sites: federated training needs at least 2 sites, got {len(roots)}")
    infos = [check_site(r, size) for r in roots]
    seen: dict[str, Path] = {}
    for r, info in zip(roots, infos):
        if info["name"] in seen:
            raise InputError(f"{r}: two sites named '{info['name']}' ({seen[info['name']]} and {r}); site names must be distinct")
        seen[info["name"]] = Path(r)
    return infos


def site_plan(n_cases: int, n_sites: int, weights: list[float] | None, set2_fraction: list[float] | None) -> tuple[list[int], list[float]]:
    """Cases per site (largest-remainder rounding of the weights, at least 2 each) and set-2 probability per site."""
    if n_sites < 2:
        raise InputError(f"--n-sites: must be >= 2, got {n_sites}")
    weights = list(weights) if weights else [float(k + 1) for k in range(n_sites)]
    fractions = list(set2_fraction) if set2_fraction else [k / (n_sites - 1) for k in range(n_sites)]
    if len(weights) != n_sites or len(fractions) != n_sites:
        raise InputError(f"--weight / --set2-fraction: give one value per site ({n_sites}), got {len(weights)} / {len(fractions)}")
    if any(w <= 0 for w in weights):
        raise InputError(f"--weight: must be > 0, got {weights}")
    if any(not 0 <= f <= 1 for f in fractions):
        raise InputError(f"--set2-fraction: must lie in [0, 1], got {fractions}")
    if n_cases < 2 * n_sites:
        raise InputError(f"source: {n_cases} skulls are too few for {n_sites} sites (at least 2 per site)")
    share = np.asarray(weights) / sum(weights) * n_cases
    counts = np.floor(share).astype(int)
    for k in np.argsort(-(share - counts))[: n_cases - counts.sum()]:  # largest remainders get the rest
        counts[k] += 1
    # At least 2 per site (one to train, one held out): take from the largest site.
    for k in range(n_sites):
        while counts[k] < 2:
            counts[int(np.argmax(counts))] -= 1
            counts[k] += 1
    return counts.tolist(), fractions


def make_sites(
    source: str | Path,
    out: str | Path,
    n_sites: int,
    *,
    seed: int = 0,
    split: str = "train",
    weights: list[float] | None = None,
    set2_fraction: list[float] | None = None,
    eval_fraction: float = 0.25,
    max_cases: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``OUT/site1 .. OUT/siteN`` (see the module docstring); returns the site folders."""
    if not 0 < eval_fraction < 1:
        raise InputError(f"--eval-fraction: must lie in (0, 1), got {eval_fraction}")
    inputs = (source,)  # replacing the output must never delete the source data set
    check_output_dir(out, overwrite, inputs)  # before the slow part
    data = load_split(source, split, max_cases)
    counts, fractions = site_plan(len(data), n_sites, weights, set2_fraction)
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(len(data))
    bounds = np.cumsum([0] + counts)
    folders = []
    with staged_output(out, overwrite, inputs) as stage:
        for k in range(n_sites):
            name = f"site{k + 1}"
            members = order[bounds[k] : bounds[k + 1]]
            n_eval = min(len(members) - 1, max(1, round(eval_fraction * len(members))))
            records = []
            for j, idx in enumerate(members):
                case_rng = np.random.default_rng([seed, k + 1, j])
                use_set2 = bool(case_rng.random() < fractions[k])
                complete = data.complete[idx].astype(bool)
                cid = data.ids[idx]
                try:
                    defective, params = (set2_defect if use_set2 else set1_defect)(complete, data.spacings[idx], case_rng)
                except InputError as exc:
                    raise InputError(f"{source}/{split}/defective/{cid}: no defect fits this skull ({exc})") from None
                target = SITE_EVAL if j < n_eval else "train"
                counts_vox = write_case(stage / name, target, cid, complete, defective, data.affines[idx])
                records.append({"split": target, "id": cid, "source": f"{source}/{split}/{cid}", "defect": params, **counts_vox})
            meta = {
                "site": name, "source": str(source), "source_split": split, "seed": seed, "n_sites": n_sites,
                "set2_fraction": fractions[k], "cases": len(members), "held_out": n_eval,
            }
            write_manifest(stage / name, records, meta)
            folders.append(Path(out) / name)
    return folders


def summarise_sites(folders: list[Path]) -> list[dict[str, Any]]:
    """One row per site written by :func:`make_sites`: name, folder, training / held-out cases, set-2 share and count."""
    from ..data.layout import read_manifest

    rows = []
    for f in folders:
        m = read_manifest(f)
        rows.append({
            "site": Path(f).name, "folder": str(f), "train": sum(1 for c in m["cases"] if c["split"] == "train"),
            "held_out": m["meta"]["held_out"], "set2_fraction": m["meta"]["set2_fraction"],
            "set2_cases": sum(1 for c in m["cases"] if c["defect"].get("set") == 2),
        })
    return rows


__all__ = ["SITE_EVAL", "check_site", "check_sites", "site_plan", "make_sites", "summarise_sites"]
