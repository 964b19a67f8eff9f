#!/usr/bin/env bash
# SAM paper (Foret et al., ICLR 2021) Table 1: WRN-28-10, 200 epochs, SGD vs SAM on CIFAR-10/100 with
# basic augmentation, Cutout and AutoAugment: configs/sam/* (12 rows).
#   recipes/sam_cifar.sh --data_dir data --download         # SEEDS, OUT, ONLY, DRY_RUN: recipes/common.sh
source "$(dirname "$0")/common.sh" "$@"
run_configs "$LAUNCH" configs/sam/*.yaml
report
