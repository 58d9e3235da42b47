# Sourced by the study scripts: `run_all` reads lines "<command> hydra.run.dir=<dir>" on stdin,
# skips those whose dir already has a results.json (so a study resumes), and runs the rest
# $JOBS at a time, printing "FAILED: <command>" for any that fail.
run_all() {
  while read -r line; do
    dir=${line##*hydra.run.dir=}
    [ -f "$dir/results.json" ] || echo "$line"
  done | xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
}

# `from_starts SPEC...`: for each seed of $SEEDS, one cwdpo.train line per SPEC, "<experiment and
# overrides>|<run dir name>", that trains stage 2 from that seed's SFT-C start under $OUT (the
# studies' common loop; pipe it into run_all).
from_starts() {
  local s spec from
  for s in ${SEEDS//,/ }; do
    from="model.path=$PWD/$OUT/seed$s/sft_only/checkpoints/sft_c_hf stage.skip=[base_sft,sft_c] seed=$s"
    for spec in "$@"; do
      echo "$PY -m cwdpo.train +experiment=${spec%|*} $COMMON $from hydra.run.dir=$PWD/$OUT/seed$s/${spec#*|}"
    done
  done
}
