# Sourced by the study scripts: `run_all` reads lines "<command> hydra.run.dir=<dir>" on stdin,
# skips those whose dir already has a results.json (so a study resumes), and runs the rest
# $JOBS at a time, printing "FAILED: <command>" for any that fail.
run_all() {
  while read -r line; do
    dir=${line##*hydra.run.dir=}
    [ -f "$dir/results.json" ] || echo "$line"
  done | xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
}
