#!/usr/bin/env bash
# The co-occurrence testbed study (issue 17), CPU-sized. Per seed: one base SFT → SFT-C run
# (`+experiment=sft_only`, also the "no stage 2" row), then every stage-2 method from that same
# SFT-C policy (π_ref = it), on the same self-judged pairs where the method uses pairs.
#   SEEDS=0,1,2 H=0.15 JOBS=2 bash experiments/testbed/run.sh
#   CONTROL=1 bash experiments/testbed/run.sh   # the clean world (null control), minimal negatives
# Finished runs (a results.json) are skipped, so the script resumes. Then the report:
#   python -m cwdpo.report experiments/testbed/runs/<name> --out experiments/testbed/<name> \
#     --compare cw_dpo:ablation_cooling --compare cw_dpo:sft_only ... --metric f1 ...
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-0,1,2}
H=${H:-0.15}
JOBS=${JOBS:-2}
METHODS=${METHODS:-cw_dpo ablation_cooling sft_continue rft chosen_only cw_dpo_shuffled}
EASY=${EASY:-cw_dpo ablation_cooling}   # each also with negatives.easy_mix=0.5
if [ "${CONTROL:-0}" = 1 ]; then
  NAME=${NAME:-control}
  DATA="data=shapes data.source.minimal_negatives=true data.source.judge=verifier"
else
  NAME=${NAME:-cooc_h$H}
  DATA="data=shapes_cooc data.source.world.hallucination_rate=$H"
fi
OUT=${OUT:-experiments/testbed/runs/$NAME}
COMMON="$DATA eval.meteor=false num_threads=1 ${EXTRA:-}"
PY=${PY:-python}
mkdir -p "$OUT"

source experiments/testbed/run_all.sh

for s in ${SEEDS//,/ }; do   # the shared starts: base SFT → SFT-C
  echo "$PY -m cwdpo.train +experiment=sft_only $COMMON seed=$s hydra.run.dir=$PWD/$OUT/seed$s/sft_only"
done | run_all

for s in ${SEEDS//,/ }; do
  from="model.path=$PWD/$OUT/seed$s/sft_only/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c]"
  for m in $METHODS; do
    neg="negatives=self_judged"
    if [ "$m" = sft_continue ] || [ "$m" = rft ]; then neg=""; fi   # they set their own
    echo "$PY -m cwdpo.train +experiment=$m $neg $COMMON $from seed=$s hydra.run.dir=$PWD/$OUT/seed$s/$m"
  done
  for m in $EASY; do
    echo "$PY -m cwdpo.train +experiment=$m negatives=self_judged negatives.easy_mix=0.5 $COMMON $from seed=$s hydra.run.dir=$PWD/$OUT/seed$s/${m}_easy50"
  done
done | run_all
