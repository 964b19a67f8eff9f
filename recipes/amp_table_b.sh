#!/usr/bin/env bash
# AMP paper (Zheng et al., CVPR 2021) Table B: WRN-28-10 and PyramidNet-164-270, ERM vs AMP, with
# standard augmentation, Cutout and AutoAugment, on SVHN, CIFAR-10 and CIFAR-100:
# configs/amp/tableB_* (36 rows), 200 epochs each. Pick a part with ONLY, e.g. ONLY=cifar10_wrn28_10.
#   recipes/amp_table_b.sh --data_dir data --download       # SEEDS, OUT, ONLY, DRY_RUN: recipes/common.sh
source "$(dirname "$0")/common.sh" "$@"
run_configs "$LAUNCH" configs/amp/tableB_*.yaml
report
