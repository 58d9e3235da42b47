#!/usr/bin/env bash
# Per-method tuning on val, then evaluation on fresh seeds (issue 17's protocol).
# Every method gets the same tuning budget: the values VALUES of one knob PARAM (by default the
# stage-2 learning rates LRS, same steps), on the tuning seeds TUNE_SEEDS, each evaluated on the
# *val* split (eval.split=val). The best value per method by mean val F1 (the primary metric) is
# then run on the evaluation seeds SEEDS from the same SFT-C starts as experiments/testbed/run.sh
# (run it first), and the report keeps only the val-selected setting of each tuned method
# (`python -m cwdpo.report --select`). Values tuned earlier (same TAG) take part in the choice.
#   NAME=cooc_c0.12 EXTRA="data.source.world.companion_contrast=0.12" bash experiments/testbed/tune.sh
#   METHODS=ipo PARAM=stage.cw_dpo.objective.beta TAG=beta VALUES="0.1 0.5 1 2 5" NAME=... bash experiments/testbed/tune.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-cooc_c0.12}
H=${H:-0.15}
TUNE_SEEDS=${TUNE_SEEDS:-10,11}
SEEDS=${SEEDS:-0,1,2,3,4}
LRS=${LRS:-5e-5 1e-4 2e-4 4e-4 8e-4}
PARAM=${PARAM:-stage.cw_dpo.optimizer.lr}   # the tuned knob, its values and its run-dir tag
VALUES=${VALUES:-$LRS}
TAG=${TAG:-lr}
METHODS=${METHODS:-cw_dpo ablation_cooling sft_continue}
NEG=${NEG:-negatives=self_judged}   # the pair methods' negatives
START=${START:-sft_only}            # the start run (its sft_c_hf checkpoint) under seed<s>/
JOBS=${JOBS:-2}
PY=${PY:-python}
DATA="data=shapes_cooc data.source.world.hallucination_rate=$H"
COMMON="$DATA eval.meteor=false num_threads=1 ${EXTRA:-}"
OUT=experiments/testbed/runs/$NAME          # evaluation runs (run.sh's directory)
TUNE=experiments/testbed/runs/$NAME-tune    # tuning runs, evaluated on val
mkdir -p "$OUT" "$TUNE"

source experiments/testbed/run_all.sh
neg_of() { if [ "$1" = sft_continue ] || [ "$1" = rft ]; then echo ""; else echo "$NEG"; fi; }

for s in ${TUNE_SEEDS//,/ }; do   # the tuning seeds' own SFT-C starts
  echo "$PY -m cwdpo.train +experiment=sft_only $COMMON seed=$s hydra.run.dir=$PWD/$TUNE/seed$s/sft_only"
done | run_all

for s in ${TUNE_SEEDS//,/ }; do
  from="model.path=$PWD/$TUNE/seed$s/$START/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c]"
  for m in $METHODS; do
    for v in $VALUES; do
      echo "$PY -m cwdpo.train +experiment=$m $(neg_of "$m") $COMMON $from $PARAM=$v eval.split=val seed=$s hydra.run.dir=$PWD/$TUNE/seed$s/${m}_$TAG$v"
    done
  done
done | run_all

# the best value per method on val (mean F1 over the tuning seeds)
best=$($PY experiments/testbed/select_on_val.py "$TUNE" "$TAG" f1 $METHODS)
for s in ${SEEDS//,/ }; do
  from="model.path=$PWD/$OUT/seed$s/$START/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c]"
  for pick in $best; do
    m=${pick%%=*}; v=${pick#*=}
    echo "$PY -m cwdpo.train +experiment=$m $(neg_of "$m") $COMMON $from $PARAM=$v seed=$s hydra.run.dir=$PWD/$OUT/seed$s/${m}_$TAG$v"
  done
done | run_all
