#!/usr/bin/env bash
# SAM paper (Foret et al., ICLR 2021) appendix Table 5: WRN-28-10 on Fashion-MNIST, SGD vs SAM with basic
# augmentation and Cutout, plus AMP and RWP under the same protocol (our rows, no paper number):
# configs/fashionmnist/* (8 rows). The data need no download (Debian package dataset-fashion-mnist).
#   recipes/sam_fashionmnist.sh                             # SEEDS, OUT, ONLY, DRY_RUN: recipes/common.sh
source "$(dirname "$0")/common.sh" "$@"
run_configs "$LAUNCH" configs/fashionmnist/*.yaml
report
