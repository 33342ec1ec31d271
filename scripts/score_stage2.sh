#!/usr/bin/env bash
# Scores of the shipped stage 1 + stage 2 at the ORIGINAL resolution (issue 13), for the README table.
#   bash scripts/score_stage2.sh EVAL_DIR OUT_DIR [KIND ...]
# EVAL_DIR: from `skullrec prepare-eval --prepared data/prepared-skullfix --out EVAL_DIR` (the 20 held-out
# SkullFix skulls); KINDs default to skullfix set1 set2 (those present in EVAL_DIR). Per kind:
#   predict (shipped weights, --keep-stage1) -> evaluate the stage-2 implant, stage 1's implant and the
#   complete skull against the truth at each skull's own 512 x 512 x Z grid; evaluate is timed.
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL=$1; OUT=$2; shift 2
KINDS=${*:-skullfix set1 set2}
SKULLREC=${SKULLREC:-.venv/bin/skullrec}
mkdir -p "$OUT"
for kind in $KINDS; do
    [ -d "$EVAL/$kind/defective" ] || { echo "skip $kind: no $EVAL/$kind/defective"; continue; }
    "$SKULLREC" predict --in "$EVAL/$kind/defective" --out "$OUT/pred_$kind" --keep-stage1 --device cpu --batch-size 1 --overwrite
    for what in implant stage1_implant; do
        start=$(date +%s%N)
        "$SKULLREC" evaluate --pred "$OUT/pred_$kind/$what" --truth "$EVAL/$kind/implant" --defective "$EVAL/$kind/defective" \
            --target implant --out "$OUT/${kind}_${what}.csv" --overwrite
        echo "evaluate $kind $what: $(( ($(date +%s%N) - start) / 1000000 )) ms wall, load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$OUT/timing.txt"
    done
    "$SKULLREC" evaluate --pred "$OUT/pred_$kind/complete" --truth "$EVAL/complete" --defective "$EVAL/$kind/defective" \
        --target skull --out "$OUT/${kind}_skull.csv" --skip-missing --overwrite
done
