#!/usr/bin/env bash
# The reports of study.sh (issue 28's protocol) from its finished runs:
#   <REP>/report.md              the claims: companion hallucination (primary) and F1, every
#                                comparison with paired t-interval, Holm p, sign-flip p, MDE, McNemar
#   <REP>_diagnostics/report.md  calibration, displacement, held-out steps / jitter / gain
#   <REP>/pair_contrast*.json    do the trained pairs contrast the planted error?
#   <REP>/tuning.md              the val tuning tables (tuning seeds)
# Setting names are the experiment + its sorted overrides (cwdpo.report groups runs by them).
#   bash experiments/testbed/study_report.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-cooc28}
PY=${PY:-python}
OUT=experiments/testbed/runs/$NAME
TUNE=$OUT-tune
REP=experiments/testbed/$NAME
NEG=negatives=companion_edit
lr_of() {  # the val-selected value of a method (tune.sh's stderr line), or stop
  local v
  v=$(grep "^$1: " "$REP/selected.txt" | awk '{print $NF}')
  [ -n "$v" ] || { echo "study_report.sh: no '$1: ...' line in $REP/selected.txt" >&2; exit 1; }
  echo "$v"
}
CW=$(lr_of cw_dpo); DPO=$(lr_of ablation_cooling); RPO=$(lr_of rpo)
SMOOTH=$(lr_of ablation_smooth_sft); SCLR=$(lr_of sft_continue)
# the constant weight the dpo_matched runs used (read back, not recomputed)
W=$(grep -ho 'loser_weight=[^ ]*' "$OUT"/seed*/dpo_matched_lr"$CW"/.hydra/overrides.yaml | sort -u | cut -d= -f2)
[ "$(echo "$W" | wc -w)" = 1 ] || { echo "study_report.sh: dpo_matched runs used weights '$W'" >&2; exit 1; }
n() { echo "$1 $NEG stage.cw_dpo.optimizer.lr=$2"; }
CWS=$(n cw_dpo "$CW")
DPOS=$(n ablation_cooling "$DPO")
RPOS=$(n rpo "$RPO")
SMOOTHS=$(n ablation_smooth_sft "$SMOOTH")
SC="sft_continue stage.cw_dpo.optimizer.lr=$SCLR"
PLAINS="sft_only stage.sft_c.datamodule.gentle_negatives=false stage.sft_c.objective.label_smoothing=0.0 stage.sft_c.objective.lam=0.0"
MIX() { echo "cw_dpo negatives.dataset_fraction=$1 negatives=mixed stage.cw_dpo.optimizer.lr=$CW"; }
compares=(
  --compare "$CWS:$DPOS" --compare "$CWS:sft_only" --compare "$CWS:$SC" --compare "$CWS:$RPOS"
  --compare "$DPOS:sft_only" --compare "$SC:sft_only" --compare "$RPOS:sft_only"
  --compare "$CWS:$SMOOTHS" --compare "sft_only:$PLAINS"
  --compare "$CWS:cw_dpo_shuffled $NEG stage.cw_dpo.optimizer.lr=$CW"
  --compare "$CWS:dpo_matched $NEG stage.cw_dpo.objective.loser_weight=$W stage.cw_dpo.optimizer.lr=$CW"
  --compare "$CWS:cw_dpo negatives=self_judged stage.cw_dpo.optimizer.lr=$CW"
  --compare "$(MIX 0.25):$(MIX 0.0)" --compare "$(MIX 0.5):$(MIX 0.0)"
  --compare "$CWS:$CWS stage_seed_offset=1000"
)
$PY -m cwdpo.report "$OUT" --out "$REP" --baseline sft_only "${compares[@]}" \
  --metric companion_halluc --metric f1
$PY -m cwdpo.report "$OUT" --out "${REP}_diagnostics" --baseline sft_only "${compares[@]}" \
  --metric calib/content_ece --metric disp/chosen_fell --metric steps_to_heldout \
  --metric heldout_jitter --metric heldout_gain_final
$PY experiments/testbed/pair_contrast.py "$OUT"/seed*/cw_dpo_lr"$CW" --out "$REP/pair_contrast.json"
$PY experiments/testbed/pair_contrast.py "$OUT"/seed*/cw_dpo_bestworst_lr"$CW" \
  --out "$REP/pair_contrast_bestworst.json"
$PY experiments/testbed/tuning_table.py "$TUNE" > "$REP/tuning.md"
$PY experiments/testbed/plots.py --out "$REP" --report "$REP/report.json" --tune "$TUNE" --curves "$OUT"
