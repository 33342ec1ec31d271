"""Table 2 rows of the reference predictors alone (no training): what ref:mean_shape / input / nearest score on a data set.

    .venv/bin/python benchmarks/reference_rows.py --data data/prepared-skullfix --max-train 40 \
        --splits eval_set1,eval_set2,eval_skullfix

Uses the experiment's own code (skullrec.experiment.sweep.evaluate_references, report.table2), so the rows
are exactly what `references: [...]` adds to a sweep on the same data set (one "seed", no CI).
"""

from __future__ import annotations

import argparse

from skullrec.experiment.report import table2
from skullrec.experiment.sweep import ExperimentConfig, evaluate_references


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-train", type=int, default=None, help="first N training skulls (what the runs trained on)")
    ap.add_argument("--splits", default="eval_set1,eval_set2")
    ap.add_argument("--references", default="mean_shape,input,nearest")
    args = ap.parse_args()
    exp = ExperimentConfig(data_root=args.data, max_train_cases=args.max_train, eval_splits=args.splits.split(","),
                           checkpoint_epochs=[0], references=args.references.split(","), methods=[], targets=["skull", "implant"])
    rows, collapse = evaluate_references(exp)
    print("| method | set | skull DSC | skull HD95 (mm) | implant DSC | implant HD (mm) | implant HD95 (mm) | pairwise DSC |")
    print("|---|---|---|---|---|---|---|---|")
    table = {(e["target"], e["method"], e["set"]): e for e in table2(rows, collapse, exp)}
    for ref in exp.references:
        for split in exp.eval_splits:
            s, i = table[("skull", f"ref:{ref}", split)], table[("implant", f"ref:{ref}", split)]
            print(f"| ref:{ref} | {split} | {s['dsc']:.3f} | {s['hd95_mm']:.1f} | {i['dsc']:.3f} | {i['hd_mm']:.1f} | "
                  f"{i['hd95_mm']:.1f} | {s['pairwise_dsc']:.3f} |")


if __name__ == "__main__":
    main()
