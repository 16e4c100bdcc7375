#!/usr/bin/env bash
# docs/results/methods.md and side-effects.md at 80 steps: every method recipe trained by `tunelab compare`
# on the same data, budget, seed and precision, one row at a time, resumable across sessions:
#
#     bash bench/methods_table.sh          # continues with the first row not yet kept; stop it any time
#
# Per row: `tunelab compare RECIPE` into runs/methods (a killed row resumes from its checkpoint), the
# intruder diagnostic for the LoRA and full rows, its OOD accuracy (bench/compare_ood.py), then its
# figures kept without weights in bench/results/methods-runs/ (bench/keep_runs.py) -- commit them. A
# row already kept is skipped, so a new session (whose runs/ is gone) goes on with the next one.
# precision is pinned to fp32 so rows made on different machines are on the same footing.
# The table: tunelab compare bench/results/methods-runs/*/ --out runs/methods-table, then
# python bench/methods_docs.py runs/methods-table/compare.json bench/results/methods-ood.json \
#     bench/results/methods-base-id.json
#
# Second seeds, for rows whose intervals overlap: SEED=1 bash bench/methods_table.sh full lora_r8 lora_r64
# (the same, with --set train.seed=1, kept in bench/results/methods-runs-seed1/, OOD in methods-ood-seed1.json;
# the first row named is the reference of that seed's comparisons).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
SEED=${SEED:-0}
SET=(--set train.steps=80 --set eval.num_examples=200 --set train.precision=fp32 --set eval.before=false)
if [ "$SEED" = 0 ]; then
  KEPT=bench/results/methods-runs OUT=runs/methods OOD=bench/results/methods-ood.json
else
  KEPT=bench/results/methods-runs-seed$SEED OUT=runs/methods-seed$SEED OOD=bench/results/methods-ood-seed$SEED.json
  SET+=(--set "train.seed=$SEED")
fi
ROWS=(full lora_r8 lora_r64 hft spiel adapter mam parallel_adapter prefix_tuning lift dsee prompt_tuning dept cpt
      ept greentrainer layers layers_lightweight lt_sft)
[ $# -gt 0 ] && ROWS=("$@")
FIRST=${ROWS[0]} SECOND=${ROWS[1]:-}
mkdir -p "$KEPT"
for row in "${ROWS[@]}"; do
  [ -d "$KEPT/$row" ] && continue
  echo "== methods table: $row, seed $SEED ($(date -u +%H:%M))"
  if [ -d "$KEPT/$FIRST" ]; then  # compare needs two targets: the kept first row is the reference (not retrained)
    $BIN/tunelab compare "$KEPT/$FIRST" "examples/methods/$row.yaml" --out "$OUT" "${SET[@]}"
  else  # the first two rows together
    $BIN/tunelab compare "examples/methods/$FIRST.yaml" "examples/methods/$SECOND.yaml" --out "$OUT" "${SET[@]}"
  fi
  for run in "$OUT"/runs/*/; do
    case $(basename "$run") in full|lora_*) [ -f "$run/diagnostics/intruder.json" ] || \
      $BIN/tunelab diagnose "$run" --only intruder ;; esac
  done
  $BIN/python bench/compare_ood.py "$OUT" --out "$OOD"
  [ -f bench/results/methods-base-id.json ] || $BIN/python bench/compare_ood.py "$OUT" --base-only \
    --data "builtin:arith?n=200&split=test" --out bench/results/methods-base-id.json
  $BIN/python bench/keep_runs.py "$OUT" "$KEPT"
done
echo "== methods table: every row kept"
