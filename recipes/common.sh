# Shared by the recipes (sourced, not run): loop configs x seeds through main.py, then report.py.
#
# Environment (all optional):
#   SEEDS    seeds to run                              (default "0 1 2")
#   OUT      parent folder of the run folders          (default runs/<recipe>; relative to the repo root)
#   LAUNCH   what starts main.py                       (default "python"; e.g. "torchrun --nproc_per_node 2":
#            batch_size is per process, so only the RWP rows keep the paper's protocol under torchrun)
#   ONLY     run only the configs whose file name contains this text (e.g. ONLY=cifar10_)
#   DRY_RUN  1 = print the commands instead of running them (same as the flag --dry-run)
# Other arguments go to every main.py command, e.g. --data_dir /data/cifar, --download, --precision bf16.
#
# Run folders are OUT/<config name>_s<seed>, a fixed name per row and seed. Each run is
#   main.py --config C --seed S --out_dir OUT --name <row>_s<seed> --on_existing resume
# so main.py decides from the folder: none yet → a new run; a checkpoint → resume it if its settings are
# this row's (a finished one is skipped; other settings, e.g. a smoke test with --epochs 1, are refused and
# count as failed: that folder is never taken as the row's result); no checkpoint (stopped before its
# first) → the folder is kept as <name>.failed-N and the run starts again. A folder that another process
# is training (its lock is held) is reported as running and skipped, so two copies of a recipe share the
# rows instead of running one twice.
# A failed run does not stop the others (the recipe exits 1 at the end); Ctrl-C (exit 130/143) stops it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-runs/$(basename "$0" .sh)}
LAUNCH=${LAUNCH:-python}
DRY_RUN=${DRY_RUN:-0}
ONLY=${ONLY:-}
EXTRA=()
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then DRY_RUN=1; else EXTRA+=("$arg"); fi
done
FAILED=0

run() {  # run (or, with DRY_RUN=1, print) one command
  if [[ $DRY_RUN == 1 ]]; then
    local line; printf -v line '%q ' "$@"; echo "${line% }"
  else
    "$@"
  fi
}

# running DIR: whether another process holds the run folder's lock (it is training there now).
running() {
  [[ -e $1/.lock ]] && ! python -c 'import fcntl, os, sys; fcntl.lockf(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_SH | fcntl.LOCK_NB)' "$1/.lock" 2>/dev/null
}

# run_configs LAUNCHER CONFIG... : every seed of SEEDS x every config, seed-major (a whole table with
# n = 1 comes first). LAUNCHER is split into words ("torchrun --nproc_per_node 2").
run_configs() {
  local launch=$1 config stem seed dir code; shift
  for seed in $SEEDS; do
    for config in "$@"; do
      stem=$(basename "$config" .yaml)
      [[ -z $ONLY || $stem == *"$ONLY"* ]] || continue
      dir=$OUT/${stem}_s$seed
      if running "$dir"; then
        echo "# $dir is running in another process; skipped" >&2
        continue
      fi
      code=0
      run $launch main.py --config "$config" --seed "$seed" --out_dir "$OUT" --name "${stem}_s$seed" \
        --on_existing resume "${EXTRA[@]}" || code=$?
      case $code in
        0) ;;
        130|143) echo "recipe stopped (exit $code); run it again to resume" >&2; exit "$code" ;;
        *) if running "$dir"; then echo "# $dir is running in another process; skipped" >&2; continue; fi
           FAILED=$((FAILED + 1)); echo "# $dir failed (exit $code); going on" >&2 ;;
      esac
    done
  done
}

# report: the table of every run under OUT; exit 1 if a run failed, else report.py's exit code.
report() {
  local code=0
  run python report.py "$OUT" || code=$?
  if (( FAILED > 0 )); then echo "$FAILED run(s) failed; see their log.txt under $OUT" >&2; exit 1; fi
  return "$code"
}
