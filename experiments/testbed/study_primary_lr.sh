#!/usr/bin/env bash
# Exploratory, added after the val tables of study.sh were seen (not after any test number):
# study.sh selects each method's lr on val F1, which picked CW-DPO's and DPO's smallest lr
# (1.25e-5), where stage 2 barely moves, while larger lrs cut val companion hallucination to
# about 0. Here each pair method's lr is selected on the *primary* metric instead (lowest mean val
# companion hallucination over the tuning seeds, ties → higher val F1), and CW-DPO, DPO, RPO and
# the two cooling controls (at CW-DPO's lr) run on the evaluation seeds. Reported separately
# (<REP>_primary_lr), labelled exploratory. Finished runs are skipped.
#   bash experiments/testbed/study_primary_lr.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-cooc28}
EXTRA=${EXTRA:-data.source.world.companion_contrast=0.12 stage.base_sft.steps=1200 data.source.sizes.val=256 callbacks.heldout.n_items=256}
SEEDS=${SEEDS:-20,21,22,23,24}
JOBS=${JOBS:-2} PY=${PY:-python}
OUT=experiments/testbed/runs/$NAME
TUNE=$OUT-tune
REP=experiments/testbed/${NAME}_primary_lr
NEG=negatives=companion_edit
source experiments/testbed/run_all.sh
COMMON="data=shapes_cooc data.source.world.hallucination_rate=0.15 eval.meteor=false num_threads=1 $EXTRA"
mkdir -p "$REP"
pick=$($PY experiments/testbed/select_on_val.py "$TUNE" lr companion_halluc cw_dpo ablation_cooling rpo)
echo "$pick" > "$REP/selected.txt"
lr() { for p in $pick; do if [ "${p%%=*}" = "$1" ]; then echo "${p#*=}"; fi; done; }
CW=$(lr cw_dpo); DPO=$(lr ablation_cooling); RPO=$(lr rpo)
from_starts "cw_dpo $NEG stage.cw_dpo.optimizer.lr=$CW|cw_dpo_lr$CW" \
            "ablation_cooling $NEG stage.cw_dpo.optimizer.lr=$DPO|ablation_cooling_lr$DPO" \
            "rpo $NEG stage.cw_dpo.optimizer.lr=$RPO|rpo_lr$RPO" \
            "cw_dpo_shuffled $NEG stage.cw_dpo.optimizer.lr=$CW|cw_dpo_shuffled_lr$CW" | run_all
# DPO with w ≡ CW-DPO's mean w_c at this lr (needs the CW-DPO runs above)
W=$($PY experiments/testbed/mean_wc.py "$OUT"/seed*/cw_dpo_lr"$CW")
from_starts "dpo_matched $NEG stage.cw_dpo.objective.loser_weight=$W stage.cw_dpo.optimizer.lr=$CW|dpo_matched_lr$CW" | run_all
n() { echo "$1 $NEG stage.cw_dpo.optimizer.lr=$2"; }
CWS=$(n cw_dpo "$CW"); DPOS=$(n ablation_cooling "$DPO"); RPOS=$(n rpo "$RPO")
$PY -m cwdpo.report "$OUT" --out "$REP" --baseline sft_only \
  --compare "$CWS:$DPOS" --compare "$CWS:sft_only" --compare "$CWS:$RPOS" \
  --compare "$DPOS:sft_only" --compare "$RPOS:sft_only" \
  --compare "$CWS:cw_dpo_shuffled $NEG stage.cw_dpo.optimizer.lr=$CW" \
  --compare "$CWS:dpo_matched $NEG stage.cw_dpo.objective.loser_weight=$W stage.cw_dpo.optimizer.lr=$CW" \
  --metric companion_halluc --metric f1
