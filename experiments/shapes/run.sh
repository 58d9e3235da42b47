#!/usr/bin/env bash
# The ShapesWorld grid (`make experiments`): every baseline and ablation × SEEDS.
# All settings of one seed start from the same base-SFT policy (the stand-in for a pretrained
# VLM), so they differ only in what the method changes. Then `cwdpo.report` aggregates.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/shapes/runs}
SEEDS=${SEEDS:-0,1,2}
EXTRA=${EXTRA:-}   # e.g. EXTRA="eval.n_records=100" for a cheaper pass
COMMON="eval.meteor=false num_threads=1 hydra/launcher=local_parallel $EXTRA"
MAIN=${MAIN:-cw_dpo,dpo,ablation_cooling,sft_only,ablation_smooth_sft,ablation_soft_penalty,ablation_negative_filtering,rpo,ipo}
SWEEPS=${SWEEPS:-main highlr mix gentle easy90 easy90_highlr}
# the stage-2 lr the committed grid ran at (the default before issue 28 set it to 1.25e-5);
# the highlr sweeps use 5× it
LR=${LR:-2e-4}
BASE="$PWD/$OUT/base"

for s in ${SEEDS//,/ }; do
  if [ ! -f "$BASE/seed$s/results.json" ]; then
    python -m cwdpo.train stage.run=[base_sft] seed="$s" eval.caption_metrics=false \
      eval.winrate=false hydra.run.dir="$BASE/seed$s" $EXTRA
  fi
done

FROM="model.path=$BASE/seed\${seed}/checkpoints/base_sft_hf stage.skip=[base_sft]"
sweep() {  # sweep <name> <overrides...>
  local name=$1; shift
  python -m cwdpo.train -m seed="$SEEDS" $FROM $COMMON "$@" \
    hydra.sweep.dir="$OUT/grid/$name"
}
for sw in $SWEEPS; do
  case $sw in
    main) sweep "${MAIN_NAME:-main}" +experiment="$MAIN" stage.cw_dpo.optimizer.lr="$LR" ;;
    # the paper's stability claim: a 5x larger stage-2 learning rate, DPO vs CW-DPO
    highlr) sweep highlr +experiment=cw_dpo,ablation_cooling stage.cw_dpo.optimizer.lr=1e-3 ;;
    mix) sweep mix +experiment=ablation_mix negatives.dataset_fraction=0,0.25,0.5,1 \
      stage.cw_dpo.optimizer.lr="$LR" ;;
    gentle) sweep gentle +experiment=ablation_gentle_weight stage.sft_c.objective.lam=0,0.5,2 \
      stage.cw_dpo.optimizer.lr="$LR" ;;
    # the harder testbed: 90% trivially wrong negatives instead of 50% (stage 1 and stage 2)
    easy90) sweep easy90 +experiment=cw_dpo,ablation_cooling,dpo,sft_only negatives.easy_fraction=0.9 \
      stage.cw_dpo.optimizer.lr="$LR" ;;
    # both stressors at once: 90% trivially wrong negatives and the 5x stage-2 learning rate
    easy90_highlr) sweep easy90_highlr +experiment=cw_dpo,ablation_cooling negatives.easy_fraction=0.9 \
      stage.cw_dpo.optimizer.lr=1e-3 ;;
  esac
done

python -m cwdpo.report "$OUT/grid" --out experiments/shapes
