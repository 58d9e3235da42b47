#!/usr/bin/env bash
# Tables for the testbed study: mean ± std per method, then per-seed paired differences with
# bootstrap 95% CIs on the pre-declared primary metric (f1) and the secondary ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
for name in ${NAMES:-cooc_h0.15 control}; do
  [ -d "experiments/testbed/runs/$name" ] || continue
  cmp=()
  for pair in cw_dpo:ablation_cooling cw_dpo:sft_only cw_dpo:sft_continue cw_dpo:rft cw_dpo:chosen_only \
              cw_dpo:cw_dpo_shuffled ablation_cooling:sft_only sft_continue:sft_only rft:sft_only \
              "cw_dpo negatives.easy_mix=0.5:ablation_cooling negatives.easy_mix=0.5"; do
    cmp+=(--compare "$pair")
  done
  $PY -m cwdpo.report "experiments/testbed/runs/$name" --out "experiments/testbed/$name" --baseline sft_only \
    "${cmp[@]}" --metric f1 --metric companion_halluc --metric chair_i --metric object_recall \
    --metric calib/content_ece --metric disp/chosen_fell
done
