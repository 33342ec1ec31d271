"""Centralised vs FedAvg vs FedSAM (+ SWA) vs FedFAM on a non-IID split, with reference rows beside them.

An experiment script, not a test. It splits the training skulls of ``--data`` (a prepared data set; a
small synthetic one is written when the folder does not exist) into ``--n-sites`` non-IID sites
(``skullrec sites`` defaults: sizes 1:2:..:N, set-2 share 0..1), runs ``skullrec federate`` once per
federated method (127.0.0.1, Flower's deployment engine), trains the centralised model with
``skullrec train`` on the union of the sites' training cases, and scores every final model on:

- the source's ``eval_set1`` / ``eval_set2`` (and ``eval_skullfix`` when present): both defect sets;
- every site's held-out ``eval_site`` cases, per site and pooled;

as skull DSC (MONAI ``compute_dice`` of ``bone logit > 0`` against the complete skull, the training
loop's validation metric) and implant DSC (reconstruction AND NOT defective against complete AND NOT
defective, ``layout.implant_of``), all on the prepared ``size^3`` grids. The reference rows
``ref:mean_shape`` and ``ref:nearest`` (skullrec.experiment.references) use the union of the sites'
training skulls and are scored the same way.

**Equal work.** Every method makes the same number of optimizer steps: rounds x local epochs x the
sum over sites of ceil(site cases / batch) for the federated runs, epochs x ceil(union / batch) for
the centralised one (the script refuses a batch size for which the two differ; with sites of 6, 12,
18, 24 cases, batch 2 or 6 is exact).

    python benchmarks/federated_reduced.py --data /path/prepared-skullfix --out results/fed_skullfix \
        --n-sites 4 --rounds 8 --local-epochs 5 --batch-size 2 --lr 1e-3 --lam 1e-4

Finished arms are reused when the script is rerun (``--arms`` runs a subset; the table is written from
every finished arm).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ARMS = ("centralised", "FedAvg", "FedSAM + SWA", "FedFAM")


def _union_dataset(sites: list[Path], source: Path, out: Path, splits: list[str]) -> Path:
    """A data set with the sites' training cases as train (ids prefixed by the site) and links to the source's eval sets."""
    from skullrec.data.layout import KINDS

    for site in sites:
        for kind in KINDS:
            (out / "train" / kind).mkdir(parents=True, exist_ok=True)
            for f in sorted((site / "train" / kind).glob("*.nii.gz")):
                target = out / "train" / kind / f"{site.name}_{f.name}"
                if not target.exists():
                    shutil.copy(f, target)
    for split in splits:
        if not (out / split).exists():
            (out / split).symlink_to((source / split).resolve(), target_is_directory=True)
    return out


def _dsc(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-case DSC (MONAI compute_dice) of (N, 1, ...) binary tensors."""
    from monai.metrics import compute_dice

    return compute_dice(pred.float(), truth.float(), include_background=True).flatten().double()


def _scores(pred: torch.Tensor, split) -> dict[str, list[float]]:
    """Per-case skull and implant DSC of predicted complete skulls ``pred`` (N, 1, S, S, S) on a TensorSplit."""
    complete, defective = split.complete.bool(), split.defective.bool()
    implant_true = complete & ~defective  # layout.implant_of, on tensors
    implant_pred = pred.bool() & ~defective
    return {"skull": _dsc(pred, complete).tolist(), "implant": _dsc(implant_pred, implant_true).tolist()}


@torch.no_grad()
def _predict(model: torch.nn.Module, split, batch: int = 4) -> torch.Tensor:
    from skullrec.nets.autoencoder import bone_logit

    model.eval()
    return torch.cat([(bone_logit(model(x)) > 0).to(torch.uint8) for x, _ in split.batches(batch)])


def _load_splits(data: Path, sites: list[Path], size: int, eval_splits: list[str]):
    from skullrec.data.cache import load_tensor_split

    splits = {name: load_tensor_split(str(data), name, size, "cpu") for name in eval_splits}
    for site in sites:
        splits[f"{site.name} held-out"] = load_tensor_split(str(site), "eval_site", size, "cpu")
    return splits


def _summarise(per_case: dict[str, dict[str, list[float]]], sites: list[Path]) -> dict[str, dict[str, float]]:
    """Mean per split; 'held-out' pools every site's held-out cases (case-weighted)."""
    out: dict[str, dict[str, float]] = {}
    for target in ("skull", "implant"):
        row = {name: float(np.mean(v[target])) for name, v in per_case.items()}
        row["held-out"] = float(np.mean([x for s in sites for x in per_case[f"{s.name} held-out"][target]]))
        out[target] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/fedbench"))
    p.add_argument("--out", type=Path, default=Path("results/federated_reduced"))
    p.add_argument("--n-train", type=int, default=18, help="synthetic data only (when --data does not exist)")
    p.add_argument("--n-eval", type=int, default=8, help="synthetic data only")
    p.add_argument("--n-sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lam", type=float, default=0.002, help="FedFAM's fam.lam")
    p.add_argument("--swa-cycle", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS) + " ('' = score only)")
    args = p.parse_args()

    from skullrec.data.synth import write_synthetic
    from skullrec.experiment.references import reference_predictions
    from skullrec.federated.run import federate
    from skullrec.federated.sites import make_sites, summarise_sites
    from skullrec.nets.checkpoint import load_checkpoint
    from skullrec.training.trainer import run_training

    repo = Path(__file__).resolve().parents[1]
    torch.set_num_threads(args.threads)
    if not (args.data / "train").is_dir():
        write_synthetic(args.data, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sites_dir = args.out / "sites"
    if not sites_dir.is_dir():
        make_sites(args.data, sites_dir, args.n_sites, seed=args.seed)
    sites = sorted(p for p in sites_dir.iterdir() if p.is_dir())
    summary = summarise_sites(sites)
    eval_splits = [s for s in ("eval_set1", "eval_set2", "eval_skullfix") if (args.data / s).is_dir()]

    # Equal work: the federated runs' total local steps against the centralised run's.
    b, epochs = args.batch_size, args.rounds * args.local_epochs
    fed_steps = epochs * sum(math.ceil(s["train"] / b) for s in summary)
    central_steps = epochs * math.ceil(sum(s["train"] for s in summary) / b)
    if fed_steps != central_steps:
        raise SystemExit(f"--batch-size {b}: federated runs make {fed_steps} steps, the centralised run {central_steps}; "
                         "choose a batch size that divides every site's training cases")

    common = [f"train.num_threads={args.threads}", "train.val_every=0", f"seed={args.seed}", f"train.batch_size={b}",
              f"train.lr={args.lr}", "data.max_train_cases=null", "data.max_eval_cases=null"]
    arms = {
        "FedAvg": (["train.method=baseline"], "fedavg"),
        "FedSAM + SWA": (["train.method=sam"], "fedavg-swa"),
        "FedFAM": (["train.method=fam", f"fam.lam={args.lam}"], "fedavg"),
    }
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    results: dict[str, Path] = {}
    seconds_file = args.out / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    union = _union_dataset(sites, args.data, args.out / "central_data", eval_splits)
    central = args.out / "centralised"
    if "centralised" in chosen and not (central / "last.safetensors").exists():
        t0 = time.perf_counter()
        run_training(repo / "configs" / "baseline.yaml", [
            f"data.root={union}", "data.eval_splits=[]", f"train.epochs={epochs}",
            f"train.checkpoint_epochs=[{epochs}]", *common,
        ], run_dir=central, overwrite=True, device="cpu", log=lambda s: print(f"[centralised] {s}", flush=True))
        seconds["centralised"] = time.perf_counter() - t0
    if (central / "last.safetensors").exists():
        results["centralised"] = central / "last.safetensors"
    for name, (train_set, strategy) in arms.items():
        folder = args.out / name.lower().replace(" ", "").replace("+", "_")
        if name in chosen and not (folder / "final.safetensors").exists():
            if folder.exists():
                shutil.rmtree(folder)
            t0 = time.perf_counter()
            fed_sets = [f"rounds={args.rounds}", f"local_epochs={args.local_epochs}", f"strategy={strategy}",
                        f"swa_cycle={args.swa_cycle}", "evaluate=false", f"train_config={repo / 'configs' / 'baseline.yaml'}"]
            federate(repo / "configs" / "federate.yaml", sites, fed_sets, train_set + common, folder, None, False,
                     echo=lambda s, n=name: print(f"[{n}] {s}", flush=True))
            seconds[name] = time.perf_counter() - t0
        if (folder / "final.safetensors").exists():
            results[name] = folder / "final.safetensors"
    seconds_file.write_text(json.dumps(seconds, indent=1) + "\n")

    splits = None
    rows = []
    for name in ARMS:
        if name not in results:
            continue
        model, cfg, _ = load_checkpoint(results[name])
        splits = splits or _load_splits(args.data, sites, cfg.model.size, eval_splits)
        per_case = {s: _scores(_predict(model, split), split) for s, split in splits.items()}
        rows.append({"method": name, **_summarise(per_case, sites), "seconds": seconds.get(name)})
    if splits is not None:  # the reference rows: the union of the sites' training skulls as the "training set"
        from skullrec.data.layout import load_split

        train = load_split(union, "train")
        for ref in ("mean_shape", "nearest"):
            per_case = {}
            for s, split in splits.items():
                pred = reference_predictions(ref, train.complete, train.defective, split.defective[:, 0].numpy())
                per_case[s] = _scores(torch.from_numpy(pred)[:, None], split)
            rows.append({"method": f"ref:{ref}", **_summarise(per_case, sites), "seconds": None})

    site_cols = [f"{s.name} held-out" for s in sites]
    cols = eval_splits + ["held-out"] + site_cols
    lines = [
        f"Sites: " + ", ".join(f"{s['site']} {s['train']} train / {s['held_out']} held out, {s['set2_cases']} set-2" for s in summary)
        + f"; {args.rounds} rounds x {args.local_epochs} local epochs, batch {b}, lr {args.lr}, FedFAM lam {args.lam}, "
        f"SWA cycle {args.swa_cycle}; {fed_steps} optimizer steps per method (centralised: {epochs} epochs on the union); "
        f"seed {args.seed}; one run per method (no seeds, no intervals).",
        "",
    ]
    for target in ("skull", "implant"):
        lines += [f"{target} DSC:", "", "| method | " + " | ".join(cols) + " | wall s |", "|---" * (len(cols) + 2) + "|"]
        for r in rows:
            wall = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
            lines.append(f"| {r['method']} | " + " | ".join(f"{r[target][c]:.3f}" for c in cols) + f" | {wall} |")
        lines.append("")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
