#!/usr/bin/env bash
# AMP paper (Zheng et al., CVPR 2021) Table A: PreActResNet18 and VGG16 on SVHN, CIFAR-10 and
# CIFAR-100, eight methods (ERM, Dropout, label smoothing, Flooding, MixUp, adversarial training,
# RMP, AMP): configs/amp/tableA_* (48 rows), 200 epochs each.
#   recipes/amp_table_a.sh --data_dir data --download       # SEEDS, OUT, ONLY, DRY_RUN: recipes/common.sh
source "$(dirname "$0")/common.sh" "$@"
run_configs "$LAUNCH" configs/amp/tableA_*.yaml
report
