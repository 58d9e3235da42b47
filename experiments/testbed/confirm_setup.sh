# Sourced by study_confirm.sh and study_confirm_cooling.sh: the confirmation's fresh seeds, run
# directory, world and pairs, so that both studies train from the same SFT-C starts.
export NAME=${NAME:-cooc28_confirm}
export EXTRA=${EXTRA:-data.source.world.companion_contrast=0.12 stage.base_sft.steps=1200 data.source.sizes.val=256 callbacks.heldout.n_items=256}
SEEDS=${SEEDS:-40,41,42,43,44}
JOBS=${JOBS:-2} PY=${PY:-python}
OUT=experiments/testbed/runs/$NAME
NEG=negatives=companion_edit
COMMON="data=shapes_cooc data.source.world.hallucination_rate=0.15 eval.meteor=false num_threads=1 $EXTRA"
source experiments/testbed/run_all.sh
