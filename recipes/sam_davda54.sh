#!/usr/bin/env bash
# davda54/sam README "Experiments" (a peer reproduction of SAM, not a paper): WRN-16-8 on CIFAR-10,
# SGD vs SAM vs ASAM with label smoothing, Cutout and a step schedule: configs/davda54/* (3 rows).
#   recipes/sam_davda54.sh --data_dir data --download        # SEEDS, OUT, ONLY, DRY_RUN: recipes/common.sh
source "$(dirname "$0")/common.sh" "$@"
run_configs "$LAUNCH" configs/davda54/*.yaml
report
