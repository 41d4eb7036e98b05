#!/usr/bin/env bash
# Every measure a candidate checkpoint's shipping rule reads (checkpoints/candidates/shipping-rule-*.md),
# beside the shipped checkpoint, into one folder of JSON files; the rule's bounds are then read off
# by hand into the folder's rule_table.md. About an hour in float32 on 2 AVX2-only cores.
#
#   bash scripts/score-candidate.sh CANDIDATE_DIR TRAIN_CONFIG OUT_DIR
#
# REFERENCE (default: the shipped checkpoint) is scored on the same splits; its held-out JSON is
# kept in OUT_DIR and reused when present (scoring is deterministic). LONG_PAIRS and WORD_PAIRS
# are the pair files no checkpoint of either chain trained on (default: the shipped chain's
# held-out categories); data/contrast_styles, which no run trained on, is scored too. A failing
# step is logged and the next one runs. SKIP names steps not to run (space-separated, as the log
# names them), e.g. SKIP="held_out integration" once a rule's line has already failed.
set -uo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash scripts/score-candidate.sh CANDIDATE_DIR TRAIN_CONFIG OUT_DIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
CK=$1 CFG=$2 OUT=$3
REFERENCE=${REFERENCE:-checkpoints/smollm2-135m-ess}
LONG_PAIRS=${LONG_PAIRS:-data/contrast_long/defamation.jsonl data/contrast_long/elections.jsonl data/contrast_long/privacy.jsonl data/contrast_long/weapons_conventional.jsonl}
WORD_PAIRS=${WORD_PAIRS:-data/contrast_words/elections.jsonl data/contrast_words/hate.jsonl data/contrast_words/suicide_self_harm.jsonl}
PY=${PY:-.venv/bin/python}
ESS=${ESS:-.venv/bin/ess}
mkdir -p "$OUT"
failed=()
step() {
  local name=$1; shift
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "=== $name: skipped (SKIP)"
    return
  fi
  echo "=== $(date +%T) $name: $*"
  "$@"
  local rc=$?
  echo "=== $(date +%T) $name: exit $rc"
  [ $rc -eq 0 ] || failed+=("$name")
}
if [ ! -s "$OUT/held_out_reference.json" ]; then
  step held_out_reference $PY -m benchmarks.held_out --config "$CFG" --checkpoint "$REFERENCE" \
    --json "$OUT/held_out_reference.json"
fi
step held_out $PY -m benchmarks.held_out --config "$CFG" --checkpoint "$CK" \
  --match-fpr "$OUT/held_out_reference.json" --json "$OUT/held_out.json"
for surface in none cyrillic; do
  suffix=$([ $surface = none ] || echo "_$surface")
  extra=$([ $surface = none ] || echo "--surface $surface")
  # shellcheck disable=SC2086  # the pair lists and $extra split into words on purpose
  step "pairs_long$suffix" $PY -m benchmarks.pair_scores --pairs $LONG_PAIRS $extra \
    --checkpoint "$REFERENCE" "$CK" --json "$OUT/pair_scores_long$suffix.json"
  # shellcheck disable=SC2086
  step "pairs_words$suffix" $PY -m benchmarks.pair_scores --pairs $WORD_PAIRS $extra \
    --checkpoint "$REFERENCE" "$CK" --json "$OUT/pair_scores_words$suffix.json"
done
step pairs_styles $PY -m benchmarks.pair_scores --pairs data/contrast_styles \
  --checkpoint "$REFERENCE" "$CK" --json "$OUT/pair_scores_styles.json"
step agreement $ESS bench agreement --checkpoint "$CK" --json "$OUT/agreement.json"
step self_refusal $PY -m benchmarks.self_refusal --checkpoint "$CK" --config "$CFG" \
  --json "$OUT/self_refusal.json"
step integration env ESS_CHECKPOINT="$CK" $PY -m pytest -q -m integration -p no:cacheprovider
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "every step ran; read the rule's lines off $OUT"
