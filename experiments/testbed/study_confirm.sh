#!/usr/bin/env bash
# Confirmation of study_primary_lr.sh's exploratory result on fresh seeds 40-44 (declared in the
# testbed README before these runs): each pair method at the lr val companion hallucination
# selected (CW-DPO 2e-4, DPO 5e-5, RPO 2e-4), SFT continuation at its val-F1 lr (2e-4), from
# new SFT-C starts; companion hallucination primary, F1 secondary, Holm over the 8 rows.
#   bash experiments/testbed/study_confirm.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/testbed/confirm_setup.sh
REP=experiments/testbed/$NAME
SEEDS=$SEEDS METHODS=" " EASY=" " OUT=$OUT bash experiments/testbed/run.sh
from_starts "cw_dpo $NEG stage.cw_dpo.optimizer.lr=2e-4|cw_dpo_lr2e-4" \
            "ablation_cooling $NEG stage.cw_dpo.optimizer.lr=5e-5|ablation_cooling_lr5e-5" \
            "rpo $NEG stage.cw_dpo.optimizer.lr=2e-4|rpo_lr2e-4" \
            "sft_continue stage.cw_dpo.optimizer.lr=2e-4|sft_continue_lr2e-4" | run_all
CWS="cw_dpo $NEG stage.cw_dpo.optimizer.lr=2e-4"
$PY -m cwdpo.report "$OUT" --out "$REP" --baseline sft_only \
  --compare "$CWS:sft_only" --compare "$CWS:ablation_cooling $NEG stage.cw_dpo.optimizer.lr=5e-5" \
  --compare "$CWS:rpo $NEG stage.cw_dpo.optimizer.lr=2e-4" \
  --compare "$CWS:sft_continue stage.cw_dpo.optimizer.lr=2e-4" \
  --metric companion_halluc --metric f1
