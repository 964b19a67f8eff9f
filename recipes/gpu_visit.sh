#!/usr/bin/env bash
# The GPU visit: everything a GPU must show, in one call of at most 8 minutes on one H200.
#
#   bash recipes/gpu_visit.sh OUT_DIR [--cpu --tiny] [--data_dir DIR] [--steps a,b] [--share STEP=SECONDS]
#
# Steps, each in its own process under `timeout` with its own time share (seconds on the GPU in
# brackets); a step that fails or runs past its share is recorded and the next one starts:
#   env            nvidia-smi -L, torch/torchvision/CUDA/cuDNN versions, the commit, a bf16 matmul's TFLOP/s  [25]
#   bench          bench.py: WRN-28-10 b128 and PreActResNet18 b50 (bf16 channels_last, fp32, bf16 NCHW,
#                  compile last) for SGD, AMP, RWP, SAM: ms/step, images/s, ratio to SGD, peak memory,
#                  TFLOP/s against the 790 TFLOP/s bf16 peak                                              [150]
#   sync_pipeline  bench.py --check_sync of every optimizer (torch.cuda.set_sync_debug_mode("error")), the
#                  CIFAR-shaped pipeline at batch 50 and 128, bench.py jpeg_decode (nvJPEG vs 16 CPU workers) [70]
#   train          main.py: configs/fashionmnist/wrn28_10_basic_{sgd,amp,rwp,sam}.yaml for 2 epochs, bf16 +
#                  channels_last, on the real Fashion-MNIST (--data_dir): epoch time with data and
#                  evaluation, test error                                                                 [150]
#   flatness       flatness.py --measures curvature on the AMP run: Hessian top eigenvalue, trace, times;
#                  bench.py flatness: Hessian-vector product ms and memory, WRN-16-4, 1,024 images
#                  (with --pyhessian where PyHessian is installed)                                        [65]
# then the report: OUT_DIR/results.json (everything) and OUT_DIR/results.md (one table). Also in OUT_DIR:
# <step>.json (the items as they finished), status/<step>.json, logs/<step>.log, bench/*.json, runs/, flatness/.
# --data_dir defaults to .data/fashion-mnist in the repository; relative paths are the caller's.
#
# --cpu --tiny: the same steps on the CPU at tiny sizes (wrn10_1, a few steps, 128 images, fp32), larger
# time shares; tests/test_gpu_visit.py runs it. --steps runs only some steps (a rerun of the failed ones
# into the same OUT_DIR); --share sets a step's time share. VISIT_COMMIT names the commit where the
# copy has no .git; PYTHON is the interpreter (default python3). The flatness step needs
# scipy (ARPACK, in requirements.txt); without it it measures sharpness only and fails. Exit code: 0 every step passed, 1 one failed or ran out of time, 2 bad arguments.
set -uo pipefail
HERE=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
abs() { if [[ $1 == /* ]]; then echo "$1"; else echo "$HERE/$1"; fi; }  # a path given relative to the caller's folder
PYTHON=${PYTHON:-python3}
usage() { echo "gpu_visit.sh: error: $1; usage: bash recipes/gpu_visit.sh OUT_DIR [--cpu --tiny] [--data_dir DIR] [--steps a,b] [--share STEP=SECONDS]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage "OUT_DIR is required"
OUT=$(abs "$1"); shift
declare -A SHARE=([env]=25 [bench]=150 [sync_pipeline]=70 [train]=150 [flatness]=65)
ALL=env,bench,sync_pipeline,train,flatness
MODE=() DATA=.data/fashion-mnist STEPS=$ALL OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu|--tiny) MODE+=("$1") ;;
    --data_dir|--steps|--share)
      [[ $# -ge 2 ]] || usage "$1 needs a value"
      case $1 in --data_dir) DATA=$(abs "$2") ;; --steps) STEPS=$2 ;; --share) OVERRIDES+=("$2") ;; esac; shift ;;
    *) usage "unknown argument $1" ;;
  esac
  shift
done
if [[ " ${MODE[*]} " == *" --tiny "* ]]; then  # a loaded 2-core CPU: bounds, not budgets
  SHARE=([env]=300 [bench]=600 [sync_pipeline]=600 [train]=600 [flatness]=300)
fi
for o in "${OVERRIDES[@]}"; do
  step=${o%%=*} s=${o#*=}
  [[ -v SHARE[$step] && $s =~ ^[1-9][0-9]*$ ]] || usage "--share $o: want STEP=SECONDS with STEP in ${!SHARE[*]}"
  SHARE[$step]=$s
done
for step in ${STEPS//,/ }; do [[ -v SHARE[$step] ]] || usage "--steps: $step is not one of ${!SHARE[*]}"; done

mkdir -p "$OUT/status" "$OUT/logs" || usage "cannot make $OUT"
words=(bash recipes/gpu_visit.sh "$OUT" "${MODE[@]}" --data_dir "$DATA")
[[ $STEPS == "$ALL" ]] || words+=(--steps "$STEPS")
for o in "${OVERRIDES[@]}"; do words+=(--share "$o"); done
printf -v line '%q ' "${words[@]}"
echo "${line% }" >> "$OUT/command.txt"  # (a rerun of some steps into OUT_DIR adds its line)
for step in ${STEPS//,/ }; do
  share=${SHARE[$step]}
  rm -f "$OUT/status/$step.json"
  t0=$(date +%s.%N)
  timeout -k 10 "$share" "$PYTHON" -m runner.gpu_visit "$step" "$OUT" "${MODE[@]}" --data_dir "$DATA" \
    > "$OUT/logs/$step.log" 2>&1
  code=$?
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  timed_out=false; [[ $code == 124 || $code == 137 ]] && timed_out=true
  printf '{"step": "%s", "share_s": %s, "seconds": %s, "exit_code": %s, "timed_out": %s}\n' \
    "$step" "$share" "$seconds" "$code" "$timed_out" > "$OUT/status/$step.json"
  echo "gpu_visit: step $step: exit $code after $seconds s (share $share s)$([[ $timed_out == true ]] && echo ', timed out')"
done
"$PYTHON" -m runner.gpu_visit report "$OUT"
