#!/usr/bin/env bash
# One SLURM task: a row of a recipe submitted with --slurm (recipes/common.sh), or
# recipes/slurm_rwp_imagenet.sbatch. The batch script ends with
#   exec bash recipes/slurm_task.sh RUN_DIR COMMAND...
# COMMAND is main.py with --on_existing resume for RUN_DIR (under python, torchrun or srun): every
# attempt of the task runs the same command, and main.py starts, continues or skips the run folder.
# Its stdout and stderr are appended to RUN_DIR/slurm.out and RUN_DIR/slurm.err, one header line and
# one end line per attempt in slurm.out (report.py reads the end line of a task that failed before
# main.py wrote anything).
# Signals (the batch scripts ask for --requeue and --signal=B:USR1@SECONDS):
#   USR1  the time limit is near: SIGTERM to COMMAND; main.py saves where it is (mid-epoch too) and
#         stops with summary.json status "interrupted"; then the task requeues itself (scontrol
#         requeue) and its next attempt continues exactly where this one stopped.
#   TERM  pre-emption, scontrol requeue, scancel: forwarded (main.py saves and stops the same way);
#         SLURM itself requeues the task (pre-emption with PreemptMode=REQUEUE, scontrol requeue) or
#         not (scancel). USR1 rather than TERM marks the time limit because scancel sends TERM too.
# Exit: COMMAND's code. A task that failed for a reason a requeue does not fix (exit 2: bad config,
# flag or data; exit 1: diverged, crashed, disk full) ends FAILED and is not requeued; SLURM requeues
# a task on its own only for node failure and pre-emption.
run_dir=$1
shift
mkdir -p "$run_dir"
exec >>"$run_dir/slurm.out" 2>>"$run_dir/slurm.err"
task=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}
printf -v cmd '%q ' "$@"
echo "# task $task attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) started $(date -u +%FT%TZ) on $(hostname): ${cmd% }"

time_limit=0
child=
forward() {  # forward SIGNAL to COMMAND (once it runs)
  [[ -n $child ]] && kill "-$1" "$child" 2>/dev/null
}
trap 'time_limit=1; echo "# time limit near (USR1): stopping the run to requeue the task"; forward TERM' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
"$@" &
child=$!
while :; do  # (wait returns early when a trapped signal arrives)
  wait "$child"
  code=$?
  if ! kill -0 "$child" 2>/dev/null; then
    wait "$child"  # (the status of a finished child, after an interrupted wait)
    code=$?
    break
  fi
done

interrupted() {  # whether main.py stopped on a signal and saved (summary.json status interrupted)
  python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("status") != "interrupted")' \
    "$run_dir/summary.json" 2>/dev/null
}
if (( time_limit )) && interrupted; then
  echo "# task ended $(date -u +%FT%TZ): exit $code; requeued (time limit)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "# task ended $(date -u +%FT%TZ): exit $code"
exit "$code"
