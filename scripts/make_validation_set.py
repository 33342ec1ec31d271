"""Carve a validation data set out of a prepared data set's *training* skulls (for choosing lambda).

    .venv/bin/python scripts/make_validation_set.py --prepared data/prepared-skullfix --out data/prepared-skullfix-val

Reads the training case ids from ``PREPARED/manifest.json``, links their source files (complete and
defective skulls, as recorded there) into a scratch folder, and runs ``skullrec prepare`` on them with
``--eval-fraction 0.2``: 64 of the 80 training skulls train, 16 are held out with set-1, set-2 and their
own defects (splits eval_set1, eval_set2, eval_skullfix). The evaluation skulls of PREPARED are never
touched, so a lambda chosen on this set has not seen them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default="data/prepared-skullfix")
    ap.add_argument("--out", default="data/prepared-skullfix-val")
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    manifest = json.loads((Path(args.prepared) / "manifest.json").read_text())
    cases = [c for c in manifest["cases"] if c["split"] == "train"]
    with tempfile.TemporaryDirectory() as tmp:
        for sub, key in (("complete", "source"), ("defective", "defective_source")):
            (Path(tmp) / sub).mkdir()
            for c in cases:
                src = Path(c[key])
                (Path(tmp) / sub / src.name).symlink_to(src.resolve())
        cmd = [sys.executable, "-m", "skullrec", "prepare", "--in", f"{tmp}/complete", "--defective", f"{tmp}/defective",
               "--out", args.out, "--eval-fraction", str(args.eval_fraction), "--seed", str(args.seed)]
        print(" ".join(cmd), flush=True)
        raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
