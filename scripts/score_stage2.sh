#!/usr/bin/env bash
# Scores of the shipped stage 1 + stage 2 at the ORIGINAL resolution (issue 13), for the table in docs/results/stage2.md.
#   bash scripts/score_stage2.sh EVAL_DIR OUT_DIR [KIND ...]
# EVAL_DIR: from `skullrec prepare-eval --prepared data/prepared-skullfix --out EVAL_DIR` (the 20 held-out
# SkullFix skulls); KINDs default to skullfix set1 set2 (those present in EVAL_DIR). Per kind:
#   predict (shipped weights, --keep-stage1; PARTS=4 processes on interleaved subsets of the cases, linked
#   back into one folder) -> evaluate (WORKERS=2) the stage-2 implant, stage 1's implant and the complete
#   skull against the truth at each skull's own 512 x 512 x Z grid; each evaluate is timed (timing.txt).
# SKIP_STAGE1=1 leaves out stage 1's implant (sheets all around the skull: its distance transforms
# cover the whole 512^2 x Z grid, several minutes per kind); SKULLREC_MODELS=DIR scores other weights.
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL=$1; OUT=$2; shift 2
KINDS=${*:-skullfix set1 set2}
SKULLREC=${SKULLREC:-$PWD/.venv/bin/skullrec}
PARTS=${PARTS:-4}
WORKERS=${WORKERS:-2}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
for kind in $KINDS; do
    [ -d "$EVAL/$kind/defective" ] || { echo "skip $kind: no $EVAL/$kind/defective"; continue; }
    src=$(cd "$EVAL/$kind/defective" && pwd)
    rm -rf "$OUT/parts_$kind" "$OUT/pred_$kind"
    files=("$src"/*)
    for ((p = 0; p < PARTS; p++)); do
        mkdir -p "$OUT/parts_$kind/in$p"
        for ((i = p; i < ${#files[@]}; i += PARTS)); do ln -s "${files[$i]}" "$OUT/parts_$kind/in$p/"; done
        [ -n "$(ls "$OUT/parts_$kind/in$p")" ] || continue
        "$SKULLREC" predict --in "$OUT/parts_$kind/in$p" --out "$OUT/parts_$kind/out$p" --keep-stage1 --device cpu \
            --batch-size 1 > "$OUT/parts_$kind/predict$p.log" 2>&1 &
    done
    wait
    for what in implant stage1_implant complete; do
        mkdir -p "$OUT/pred_$kind/$what"
        for f in "$OUT/parts_$kind"/out*/"$what"/*; do ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$OUT/pred_$kind/$what/"; done
    done
    scored="implant"; [ "${SKIP_STAGE1:-0}" = 1 ] || scored="implant stage1_implant"
    for what in $scored; do
        start=$(date +%s%N)
        "$SKULLREC" evaluate --pred "$OUT/pred_$kind/$what" --truth "$EVAL/$kind/implant" --defective "$EVAL/$kind/defective" \
            --target implant --out "$OUT/${kind}_${what}.csv" --workers "$WORKERS" --overwrite
        echo "evaluate $kind $what ($(ls "$OUT/pred_$kind/$what" | wc -l) cases, --workers $WORKERS):" \
             "$(( ($(date +%s%N) - start) / 1000000 )) ms wall, load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$OUT/timing.txt"
    done
    "$SKULLREC" evaluate --pred "$OUT/pred_$kind/complete" --truth "$EVAL/complete" --defective "$EVAL/$kind/defective" \
        --target skull --out "$OUT/${kind}_skull.csv" --workers "$WORKERS" --skip-missing --overwrite
done
