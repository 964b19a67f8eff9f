# Shared by the recipes (sourced, not run): loop configs x seeds through main.py, then report.py; or,
# with --slurm, submit them to SLURM as job arrays and the report as a job that runs after them.
#
#   recipes/X.sh [--dry-run] [--seeds 0-4] [MAIN.PY ARGS ...]
#   recipes/X.sh --slurm [--dry-run] [--seeds 0-4] [--max-running K] [--gpus-per-process G] [MAIN.PY ARGS ...]
#                [-- SBATCH OPTIONS ...]
# Environment (all optional):
#   SEEDS    seeds to run                              (default "0 1 2"; --seeds: 0-4, 0,2,5 or "0 1")
#   OUT      parent folder of the run folders          (default runs/<recipe>; relative to the repo root)
#   LAUNCH   what starts main.py                       (default "python"; e.g. "torchrun --nproc_per_node 2":
#            batch_size is per process, so only the RWP rows keep the paper's protocol under torchrun)
#   ONLY     run only the configs whose file name contains this text (e.g. ONLY=cifar10_)
#   DRY_RUN  1 = print the commands instead of running them (same as the flag --dry-run)
# Other arguments go to every main.py command, e.g. --data_dir /data/cifar, --download, --precision bf16.
# SLURM mode (recipes/slurm.sh): one array task per (row, seed), K at a time, G GPUs per process
# (default 1; 0 on a CPU-only cluster); options after -- go to every sbatch (partition, account, time).
# It exits 0 once submitted, 1 if sbatch refused a job (its message above); bad recipe options: one line, exit 2.
#
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEEDS=${SEEDS:-0 1 2}
RECIPE=$(basename "$0" .sh)
OUT=${OUT:-runs/$RECIPE}
LAUNCH=${LAUNCH:-python}
DRY_RUN=${DRY_RUN:-0}
ONLY=${ONLY:-}
SLURM=0
MAX_RUNNING=
GPUS_PER_PROCESS=
EXTRA=()
SBATCH_OPTIONS=()
usage() { echo "$(basename "$0"): $1" >&2; exit 2; }
seed_list() {  # seed_list 0-4 | 0,2,5 | "0 1": the seeds, space-separated
  local part out=()
  for part in ${1//,/ }; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]] && (( BASH_REMATCH[1] <= BASH_REMATCH[2] )); then
      out+=($(seq "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"))
    elif [[ $part =~ ^[0-9]+$ ]]; then out+=("$part")
    else usage "--seeds: $1 is not a seed list (e.g. 0-4, 0,2,5 or \"0 1\")"; fi
  done
  (( ${#out[@]} )) || usage "--seeds: no seeds given"
  echo "${out[*]}"
}
while (( $# )); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --slurm) SLURM=1 ;;
    --seeds|--max-running|--gpus-per-process)
      (( $# > 1 )) || usage "$1 needs a value"
      case $1 in
        --seeds) SEEDS=$(seed_list "$2") || exit 2 ;;
        --max-running) [[ $2 =~ ^[1-9][0-9]*$ ]] || usage "--max-running: $2 is not a positive whole number"
                       MAX_RUNNING=$2 ;;
        --gpus-per-process) [[ $2 =~ ^[0-9]+$ ]] || usage "--gpus-per-process: $2 is not a whole number"
                            GPUS_PER_PROCESS=$2 ;;
      esac
      shift ;;
    --) shift; SBATCH_OPTIONS=("$@"); break ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done
if (( ! SLURM )); then
  [[ -z $MAX_RUNNING && -z $GPUS_PER_PROCESS ]] || usage "--max-running and --gpus-per-process need --slurm"
  (( ${#SBATCH_OPTIONS[@]} == 0 )) || usage "options after -- go to sbatch and need --slurm"
fi
SEEDS=$(seed_list "$SEEDS") || exit 2
source recipes/slurm.sh
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

# check_extra CONFIG: the arguments for main.py, checked once with the first row's config as main.py
# checks them, so a typo or a bad value is one line and exit 2, not one failed run per row.
EXTRA_CHECKED=0
check_extra() {
  (( EXTRA_CHECKED == 0 && ${#EXTRA[@]} )) || return 0
  EXTRA_CHECKED=1
  python -c 'import sys
from runner.config import UsageError, parse_config
try:
    parse_config(sys.argv[2:])
except UsageError as e:
    print(f"{sys.argv[1]}: for main.py: {e}", file=sys.stderr)
    sys.exit(2)' "$RECIPE.sh" --config "$1" "${EXTRA[@]}" || exit 2
}

# run_configs LAUNCHER CONFIG... : every seed of SEEDS x every config, seed-major (a whole table with
# n = 1 comes first). LAUNCHER is split into words ("torchrun --nproc_per_node 2").
run_configs() {
  local launch=$1 config stem seed dir code; shift
  for seed in $SEEDS; do
    for config in "$@"; do
      stem=$(basename "$config" .yaml)
      [[ -z $ONLY || $stem == *"$ONLY"* ]] || continue
      check_extra "$config"
      dir=$OUT/${stem}_s$seed
      if (( SLURM )); then  # (submitted by report)
        slurm_add "$launch" "$stem" "$seed" main.py --config "$config" --seed "$seed" --out_dir "$OUT" \
          --name "${stem}_s$seed" --on_existing resume "${EXTRA[@]}"
        continue
      fi
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
# With --slurm: submit the rows' array jobs and the report job instead (recipes/slurm.sh).
report() {
  if (( SLURM )); then slurm_submit; return; fi
  local code=0
  run python report.py "$OUT" || code=$?
  if (( FAILED > 0 )); then echo "$FAILED run(s) failed; see their log.txt under $OUT" >&2; exit 1; fi
  return "$code"
}
