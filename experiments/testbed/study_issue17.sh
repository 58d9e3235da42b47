#!/usr/bin/env bash
# The testbed study of issue 17, end to end (≈ 2 h on 2 CPU cores): a base trained close
# to its plateau (base SFT 1200 steps), faint companion (contrast 0.12), annotator noise h = 0.15.
#   1. the SFT-C starts of the evaluation seeds 0-4 (run.sh; also the "no stage 2" row);
#   2. per method, the stage-2 lr grid LRS on the tuning seeds 10, 11, scored on val, and the
#      val-selected lr on seeds 0-4 (tune.sh);
#   3. controls at the tuned lrs: w_c shuffled, DPO with w ≡ CW-DPO's mean w_c, easy_mix 0.5;
#   4. IPO with β tuned on val the same way, RPO at DPO's tuned lr;
#   5. the null control: the clean world, same base budget, the tuned lrs;
#   6. the reports (report.md with paired bootstrap CIs), the pair-contrast count, the figures.
# Finished runs (a results.json) are skipped, so the script resumes.
#   bash experiments/testbed/study.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export NAME=${NAME:-cooc_c0.12_base1200}
export EXTRA=${EXTRA:-data.source.world.companion_contrast=0.12 stage.base_sft.steps=1200}
export LRS=${LRS:-1.25e-5 5e-5 2e-4 8e-4}
export JOBS=${JOBS:-2} PY=${PY:-python}
OUT=experiments/testbed/runs/$NAME
TUNED="cw_dpo ablation_cooling sft_continue chosen_only rft"
COMMON="data=shapes_cooc data.source.world.hallucination_rate=0.15 eval.meteor=false num_threads=1 $EXTRA"

SEEDS=0,1,2,3,4 METHODS=" " EASY=" " bash experiments/testbed/run.sh
SEEDS=0,1,2,3,4 METHODS="$TUNED" bash experiments/testbed/tune.sh 2> "$OUT/selected.txt"
cat "$OUT/selected.txt"
CW=$(grep "^cw_dpo: " "$OUT/selected.txt" | awk '{print $NF}')
DPO=$(grep "^ablation_cooling: " "$OUT/selected.txt" | awk '{print $NF}')
W=$($PY experiments/testbed/mean_wc.py "$OUT"/seed*/cw_dpo_lr"$CW")
echo "controls at CW-DPO's lr $CW (mean w_c $W) and DPO's lr $DPO"
for s in 0 1 2 3 4; do
  from="model.path=$PWD/$OUT/seed$s/sft_only/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c] seed=$s"
  sj="negatives=self_judged"
  for spec in "cw_dpo_shuffled $sj stage.cw_dpo.optimizer.lr=$CW|cw_dpo_shuffled_lr$CW" \
              "dpo_matched $sj stage.cw_dpo.objective.loser_weight=$W stage.cw_dpo.optimizer.lr=$CW|dpo_matched_lr$CW" \
              "cw_dpo $sj negatives.easy_mix=0.5 stage.cw_dpo.optimizer.lr=$CW|cw_dpo_easy50_lr$CW" \
              "ablation_cooling $sj negatives.easy_mix=0.5 stage.cw_dpo.optimizer.lr=$DPO|ablation_cooling_easy50_lr$DPO" \
              "rpo $sj stage.cw_dpo.optimizer.lr=$DPO|rpo_lr$DPO"; do
    dir=$PWD/$OUT/seed$s/${spec#*|}
    [ -f "$dir/results.json" ] || echo "$PY -m cwdpo.train +experiment=${spec%|*} $COMMON $from hydra.run.dir=$dir"
  done
done | xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
SEEDS=0,1,2,3,4 METHODS=ipo PARAM=stage.cw_dpo.objective.beta TAG=beta VALUES="0.1 0.5 1 2 5 10" \
  bash experiments/testbed/tune.sh

# the null control: the clean world (data=shapes: no rule, no annotator noise) with the same
# minimal negatives, verifier judge, base budget and self-judged pairs; each method at the lr
# the testbed's val tuning selected (not re-tuned on the control)
CTRL=experiments/testbed/runs/${NAME}_control
CONTROL=1 NAME=${NAME}_control EXTRA="stage.base_sft.steps=1200" SEEDS=0,1,2,3,4 METHODS=" " EASY=" " \
  bash experiments/testbed/run.sh
CDATA="data=shapes data.source.minimal_negatives=true data.source.judge=verifier eval.meteor=false num_threads=1 stage.base_sft.steps=1200"
SCLR=$(grep "^sft_continue: " "$OUT/selected.txt" | awk '{print $NF}')
for s in 0 1 2 3 4; do
  from="model.path=$PWD/$CTRL/seed$s/sft_only/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c] seed=$s"
  for spec in "cw_dpo negatives=self_judged stage.cw_dpo.optimizer.lr=$CW|cw_dpo_lr$CW" \
              "ablation_cooling negatives=self_judged stage.cw_dpo.optimizer.lr=$DPO|ablation_cooling_lr$DPO" \
              "sft_continue stage.cw_dpo.optimizer.lr=$SCLR|sft_continue_lr$SCLR"; do
    dir=$PWD/$CTRL/seed$s/${spec#*|}
    [ -f "$dir/results.json" ] || echo "$PY -m cwdpo.train +experiment=${spec%|*} $CDATA $from hydra.run.dir=$dir"
  done
done | xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'

# reports: the tuned methods (val-selected settings only), then every setting (controls)
n() { echo "$1 negatives=self_judged stage.cw_dpo.optimizer.lr=$2"; }
CWS=$(n cw_dpo "$CW"); DPOS=$(n ablation_cooling "$DPO")
ez() { echo "$1 negatives.easy_mix=0.5 negatives=self_judged stage.cw_dpo.optimizer.lr=$2"; }  # sorted
metrics=(--metric f1 --metric companion_halluc --metric calib/content_ece --metric disp/chosen_fell
         --metric steps_to_heldout --metric heldout_jitter)
$PY -m cwdpo.report "$OUT" --out "experiments/testbed/$NAME" --baseline sft_only \
  --select "experiments/testbed/runs/$NAME-tune" \
  --compare "cw_dpo:ablation_cooling" --compare "cw_dpo:sft_only" --compare "cw_dpo:sft_continue" \
  --compare "ablation_cooling:sft_only" --compare "sft_continue:sft_only" --compare "cw_dpo:rft" \
  --compare "cw_dpo:chosen_only" --compare "rft:sft_only" --compare "cw_dpo:ipo" "${metrics[@]}"
$PY -m cwdpo.report "$OUT" --out "experiments/testbed/${NAME}_controls" --baseline sft_only \
  --compare "$CWS:cw_dpo_shuffled" --compare "$CWS:dpo_matched" --compare "$CWS:chosen_only" \
  --compare "$(ez cw_dpo "$CW"):$CWS" --compare "$(ez ablation_cooling "$DPO"):$DPOS" \
  --compare "$(ez cw_dpo "$CW"):$(ez ablation_cooling "$DPO")" \
  --compare "rpo:$DPOS" --compare "$CWS:rpo" "${metrics[@]}"
$PY -m cwdpo.report "$CTRL" --out "experiments/testbed/${NAME}_control" --baseline sft_only \
  --compare cw_dpo:ablation_cooling --compare cw_dpo:sft_only --compare cw_dpo:sft_continue \
  --compare sft_continue:sft_only --compare ablation_cooling:sft_only --metric f1 \
  --metric calib/content_ece --metric disp/chosen_fell
$PY experiments/testbed/pair_contrast.py "$OUT"/seed{0,1,2,3,4}/cw_dpo_lr"$CW" \
  --out "experiments/testbed/$NAME/pair_contrast.json"
$PY experiments/testbed/plots.py --out "experiments/testbed/$NAME" \
  --report "experiments/testbed/$NAME/report.json" --tune "experiments/testbed/runs/$NAME-tune" \
  --curves "$OUT"
