#!/usr/bin/env bash
# Tables for the testbed study: mean ± std per method, then per-seed paired differences with
# bootstrap 95% CIs on the pre-declared primary metric (f1) and the secondary ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
for name in ${NAMES:-cooc_c0.12 cooc_c0.12_h0 cooc_c0.12_h0.3 cooc_h0.15 control}; do
  [ -d "experiments/testbed/runs/$name" ] || continue
  # setting names = experiment + the overrides not shared by every run of the directory
  SJ="negatives=self_judged"
  CW="cw_dpo $SJ"; DPO="ablation_cooling $SJ"; EZ="negatives.easy_mix=0.5 $SJ"
  cmp=()
  for pair in "$CW:$DPO" "$CW:sft_only" "$CW:sft_continue" "$CW:rft" "$CW:chosen_only $SJ" \
              "$CW:cw_dpo_shuffled $SJ" "$CW:dpo_matched" "$DPO:sft_only" "sft_continue:sft_only" "rft:sft_only" \
              "cw_dpo $EZ:ablation_cooling $EZ" "cw_dpo $EZ:$CW"; do
    cmp+=(--compare "$pair")   # a pair whose settings did not run is skipped with a note
  done
  $PY -m cwdpo.report "experiments/testbed/runs/$name" --out "experiments/testbed/$name" --baseline sft_only \
    "${cmp[@]}" --metric f1 --metric companion_halluc --metric chair_i --metric object_recall \
    --metric calib/content_ece --metric disp/chosen_fell
done
