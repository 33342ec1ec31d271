"""A reduced-protocol comparison: centralised vs FedAvg vs FedSAM (+ SWA) vs FedFAM on a non-IID split.

An experiment script, not a test. It writes a small synthetic data set (unless --data exists), splits
its training skulls into --n-sites non-IID sites (``skullrec sites`` defaults: sizes 1:2:..:N, set-2
share 0..1), runs ``skullrec federate`` once per federated method (127.0.0.1, Flower deployment
engine), trains the centralised model on the union of the sites' training cases for the same number of
epochs (rounds x local epochs), and scores every final model with MONAI's DSC of ``logits > 0`` on the
source's eval_set1 and eval_set2 (both defect sets) and on the union of the sites' held-out cases.

    python benchmarks/federated_reduced.py --out results/federated_reduced --rounds 5 --local-epochs 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def _union_dataset(sites: list[Path], source: Path, out: Path) -> Path:
    """A data set with the sites' training cases as train (ids prefixed by the site) and the source's eval sets."""
    from skullrec.data.layout import KINDS

    for site in sites:
        for kind in KINDS:
            (out / "train" / kind).mkdir(parents=True, exist_ok=True)
            for f in sorted((site / "train" / kind).glob("*.nii.gz")):
                shutil.copy(f, out / "train" / kind / f"{site.name}_{f.name}")
    for split in ("eval_set1", "eval_set2"):
        if not (out / split).exists():
            (out / split).symlink_to((source / split).resolve(), target_is_directory=True)
    return out


def _score(checkpoint: Path, splits: dict[str, tuple[Path | list[Path], str]]) -> dict[str, float]:
    """Mean DSC per named split; a list of roots pools their cases (case-weighted)."""
    from skullrec.data.cache import load_tensor_split
    from skullrec.nets.checkpoint import load_checkpoint
    from skullrec.training.trainer import evaluate_dsc

    model, cfg, _ = load_checkpoint(checkpoint)
    out = {}
    for name, (root, split) in splits.items():
        if isinstance(root, list):
            vals, n = 0.0, 0
            for r in root:
                s = load_tensor_split(str(r), split, cfg.model.size, "cpu")
                vals += float(evaluate_dsc(model, s, 8)) * len(s)
                n += len(s)
            out[name] = vals / n
        else:
            out[name] = float(evaluate_dsc(model, load_tensor_split(str(root), split, cfg.model.size, "cpu"), 8))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/fedbench"))
    p.add_argument("--out", type=Path, default=Path("results/federated_reduced"))
    p.add_argument("--n-train", type=int, default=18)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--n-sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from skullrec.data.synth import write_synthetic
    from skullrec.federated.run import federate
    from skullrec.federated.sites import make_sites, summarise_sites
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
    common = [f"train.num_threads={args.threads}", "train.val_every=0", f"seed={args.seed}"]
    arms = {
        "FedAvg": (["train.method=baseline"], "fedavg"),
        "FedSAM + SWA": (["train.method=sam"], "fedavg-swa"),
        "FedFAM": (["train.method=fam", "fam.lam=0.002"], "fedavg"),
    }
    results, seconds = {}, {}
    for name, (train_set, strategy) in arms.items():
        folder = args.out / name.lower().replace(" ", "").replace("+", "_")
        t0 = time.perf_counter()
        if not (folder / "final.safetensors").exists():  # a finished arm is reused when the script is rerun
            if folder.exists():
                shutil.rmtree(folder)
            fed_sets = [f"rounds={args.rounds}", f"local_epochs={args.local_epochs}", f"strategy={strategy}",
                        f"train_config={repo / 'configs' / 'baseline.yaml'}"]
            federate(repo / "configs" / "federate.yaml", sites, fed_sets, train_set + common, folder, None, False,
                     echo=lambda s, n=name: print(f"[{n}] {s}", flush=True))
        seconds[name] = time.perf_counter() - t0
        results[name] = folder / "final.safetensors"
    union = _union_dataset(sites, args.data, args.out / "central_data")
    t0 = time.perf_counter()
    central = args.out / "centralised"
    if not (central / "last.safetensors").exists():
        run_training(repo / "configs" / "baseline.yaml", [
            f"data.root={union}", f"train.epochs={args.rounds * args.local_epochs}",
            f"train.checkpoint_epochs=[{args.rounds * args.local_epochs}]", *common,
        ], run_dir=central, overwrite=True, device="cpu", log=lambda s: print(f"[centralised] {s}", flush=True))
    seconds["centralised"] = time.perf_counter() - t0
    results = {"centralised": central / "last.safetensors", **results}
    splits = {"eval_set1": (args.data, "eval_set1"), "eval_set2": (args.data, "eval_set2"), "held_out": (sites, "eval_site")}
    rows = [{"method": m, **_score(c, splits), "seconds": seconds.get(m)} for m, c in results.items()]
    lines = [
        f"Reduced protocol: {args.n_train} synthetic training skulls split into {args.n_sites} non-IID sites "
        + ", ".join(f"{s['site']} {s['train']} train / {s['held_out']} held out, {s['set2_cases']} set-2" for s in summary)
        + f"; {args.rounds} rounds x {args.local_epochs} local epochs (centralised: {args.rounds * args.local_epochs} epochs on the union); "
        f"{args.n_eval} skulls per eval set; seed {args.seed}; one run per method (no seeds, no intervals).",
        "",
        "| method | DSC eval_set1 | DSC eval_set2 | DSC sites' held-out | wall s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['eval_set1']:.4f} | {r['eval_set2']:.4f} | {r['held_out']:.4f} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
