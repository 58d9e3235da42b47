#!/usr/bin/env bash
# Confirmation of the exploratory cooling-control result (study_primary_lr.sh: CW-DPO − DPO at
# w ≡ CW-DPO's mean w_c, −3.45 [−5.52, −1.38] companion hallucination on 5/5 seeds, Holm p 0.13)
# on study_confirm.sh's fresh seeds 40-44 and SFT-C starts, declared in the testbed README before
# these runs: both cooling controls at CW-DPO's lr 2e-4 on companion-edit pairs,
#   - DPO with a constant loser weight w = the mean w_c of this study's CW-DPO runs (mean_wc.py),
#   - CW-DPO with its cooling weights shuffled within each batch;
# companion hallucination primary, F1 secondary, Holm over the 4 rows. Run study_confirm.sh first.
#   bash experiments/testbed/study_confirm_cooling.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/testbed/confirm_setup.sh
REP=experiments/testbed/${NAME}_cooling
LR=2e-4
W=$($PY experiments/testbed/mean_wc.py "$OUT"/seed*/cw_dpo_lr$LR)
echo "loser_weight = mean w_c of cw_dpo = $W"
from_starts "dpo_matched $NEG stage.cw_dpo.objective.loser_weight=$W stage.cw_dpo.optimizer.lr=$LR|dpo_matched_lr$LR" \
            "cw_dpo_shuffled $NEG stage.cw_dpo.optimizer.lr=$LR|cw_dpo_shuffled_lr$LR" | run_all
CWS="cw_dpo $NEG stage.cw_dpo.optimizer.lr=$LR"
$PY -m cwdpo.report "$OUT" --out "$REP" --baseline sft_only \
  --compare "$CWS:dpo_matched $NEG stage.cw_dpo.objective.loser_weight=$W stage.cw_dpo.optimizer.lr=$LR" \
  --compare "$CWS:cw_dpo_shuffled $NEG stage.cw_dpo.optimizer.lr=$LR" \
  --metric companion_halluc --metric f1
