#!/usr/bin/env bash
# What the default job (`python -m cwdpo.train`: ShapesWorld, 400-step base, SFT-C, CW-DPO with
# dataset negatives) shows, with its stage-2 lr selected on val (issue 28), ≈ 15 min on 2 cores
# (11.5 min measured, 2026-12-06):
#   1. the starts (base SFT → SFT-C) of tuning seeds 30, 31;
#   2. stage 2 at each lr of LRS on those starts, scored on a 256-image val split (facts %);
#   3. the default job at the val-selected lr (the shipped default, cwdpo/conf/stage/pipeline.yaml
#      cw_dpo.optimizer.lr, is set to it) on fresh seeds 20-24, and the report: facts % after
#      SFT-C and after CW-DPO, malformed %, per seed and mean ± std.
# Finished runs (a results.json) are skipped, so the script resumes.
#   bash experiments/shapes/default_job.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/shapes/runs/default_job}
LRS=${LRS:-1.25e-5 5e-5 2e-4}
JOBS=${JOBS:-2} PY=${PY:-python}
VAL="data.source.sizes.val=256 callbacks.heldout.n_items=256"
mkdir -p "$OUT"
source experiments/testbed/run_all.sh
for s in 30 31; do
  echo "$PY -m cwdpo.train +experiment=sft_only num_threads=1 $VAL seed=$s hydra.run.dir=$PWD/$OUT/tune/seed$s/sft_only"
done | run_all
for s in 30 31; do
  for lr in $LRS; do
    echo "$PY -m cwdpo.train num_threads=1 $VAL model.path=$PWD/$OUT/tune/seed$s/sft_only/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c] stage.cw_dpo.optimizer.lr=$lr eval.split=val seed=$s hydra.run.dir=$PWD/$OUT/tune/seed$s/cw_dpo_lr$lr"
  done
done | run_all
BEST=$($PY experiments/testbed/select_on_val.py "$OUT/tune" lr fact_accuracy cw_dpo)
BEST=${BEST#cw_dpo=}
echo "val-selected stage-2 lr: $BEST"
for s in 20 21 22 23 24; do
  echo "$PY -m cwdpo.train num_threads=1 stage.cw_dpo.optimizer.lr=$BEST seed=$s hydra.run.dir=$PWD/$OUT/seed$s"
done | run_all
$PY experiments/shapes/default_job.py "$OUT"
