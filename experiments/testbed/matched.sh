#!/usr/bin/env bash
# DPO with a constant loser weight equal to CW-DPO's mean w_c (one value: the mean of
# train/cooling/mean over the cw_dpo runs of every seed), from the same SFT-C start. Run after run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-0,1,2}
H=${H:-0.15}
JOBS=${JOBS:-1}
PY=${PY:-python}
OUT=${OUT:-experiments/testbed/runs/cooc_h$H}
COMMON="data=shapes_cooc data.source.world.hallucination_rate=$H eval.meteor=false num_threads=1 ${EXTRA:-}"
W=$($PY experiments/testbed/mean_wc.py "$OUT"/seed*/cw_dpo)
echo "loser_weight = mean w_c of cw_dpo = $W"
for s in ${SEEDS//,/ }; do
  dir="$PWD/$OUT/seed$s/dpo_matched"
  [ -f "$dir/results.json" ] && continue
  echo "$PY -m cwdpo.train +experiment=dpo_matched negatives=self_judged stage.cw_dpo.objective.loser_weight=$W $COMMON model.path=$PWD/$OUT/seed$s/sft_only/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c] seed=$s hydra.run.dir=$dir"
done | xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
