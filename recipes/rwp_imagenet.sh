#!/usr/bin/env bash
# RWP paper (Li et al., arXiv 2211.11489) ImageNet recipe, from nblt/RWP recipes/run_rwp_imagenet.sh:
# torchvision ResNet-18 (and ResNet-50, same protocol), SGD vs RWP: configs/imagenet/* (4 rows).
# No paper numbers (none retrievable); the report adds a top-5 column.
#   recipes/rwp_imagenet.sh --data_dir /data/imagenet                   # one GPU (RWP: two passes a step)
#   NPROC=4 LAUNCH="torchrun --nproc_per_node 4" recipes/rwp_imagenet.sh --data_dir /data/imagenet
#       4 GPUs, the official setting: RWP's clean and perturbed terms on different ranks.
#   Many nodes: see recipes/slurm_rwp_imagenet.sbatch (one config per job, requeued on pre-emption).
# NPROC: the total process count LAUNCH starts (default 1). batch_size is per process, so with NPROC > 1
# every command gets --batch_size for the official total: SGD 256 / NPROC, RWP 2 x 256 / NPROC (256 per
# term, each term on half the processes); NPROC must divide it (and be even for RWP).
source "$(dirname "$0")/common.sh" "$@"
NPROC=${NPROC:-1}
BASE=("${EXTRA[@]}")
per_process() {  # per_process TOTAL: --batch_size TOTAL / NPROC when NPROC > 1
  if (( NPROC > 1 )); then
    if (( $1 % NPROC )); then echo "NPROC=$NPROC does not divide the batch of $1" >&2; exit 2; fi
    echo "--batch_size $(( $1 / NPROC ))"
  fi
}
# shellcheck disable=SC2207
EXTRA=("${BASE[@]}" $(per_process 256))
run_configs "$LAUNCH" configs/imagenet/*_sgd.yaml
# shellcheck disable=SC2207
EXTRA=("${BASE[@]}" $(per_process 512))
run_configs "$LAUNCH" configs/imagenet/*_rwp.yaml
report
