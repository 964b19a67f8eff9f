#!/usr/bin/env bash
# RWP (Li et al., arXiv 2211.11489) and m-RWP/ARWP (TMLR 2024) CIFAR recipes: ResNet-18, VGG16-BN,
# WRN-16-8 and WRN-28-10, SGD vs RWP (+ m-ARWP, ARWP) on CIFAR-10/100: configs/rwp/* (18 rows).
# The papers' tables were not available here, so the report shows no paper column values.
#   recipes/rwp_cifar.sh --data_dir data --download         # one GPU: the two RWP passes in turn (~2x SGD)
#   LAUNCH="torchrun --nproc_per_node 2" recipes/rwp_cifar.sh --data_dir data
#       2 GPUs = the paper's parallel RWP (clean and perturbed gradient on different GPUs, ~1x SGD time).
# LAUNCH applies to the RWP rows only: the SGD, m-ARWP and ARWP rows always run in one process, since
# under torchrun batch_size is per process (and ARWP needs each term's own gradient).
source "$(dirname "$0")/common.sh" "$@"
run_configs python configs/rwp/*_sgd.yaml configs/rwp/*_marwp.yaml configs/rwp/*_arwp.yaml
run_configs "$LAUNCH" configs/rwp/*_rwp.yaml
report
