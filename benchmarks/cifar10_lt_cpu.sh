#!/usr/bin/env bash
# CIFAR-10-LT, the reduced CPU protocol (BENCHMARKS.md section 9): the models, losses and
# recipe of configs/cifar10_lt with the data and the schedule cut to fit 2 CPU cores.
#   * 1,000 training images per class before the long tail (data.max_train_samples=10000,
#     a stratified draw per seed), so IR 100 keeps 2,478 images and IR 10 4,084; a tenth of
#     each class is held out for validation;
#   * 10 epochs instead of 200, everything else in proportion: 1 warm-up epoch, x0.01 at
#     epochs 8 and 9 (160 and 180 of 200);
#   * batch 32 with the learning rate scaled linearly (0.025): 4 times the optimiser steps
#     for about the same CPU time (batch 128 leaves 180 steps in all, and CE at 17% top-1);
#   * the full 10,000 test images; channels-last (1.12x at batch 32 on this CPU:
#     benchmarks/cifar_step_speed.py); no plots.
# Methods: CE, CE + SAR, logit adjustment, LA + SAR, with the shipped (release) SAR settings:
# nothing was tuned, on validation or test. Seeds 0-2, two single-thread runs at a time.
# Tables: runs/cifar10_lt_cpu/ir{100,10}/results.md. RATIOS and SEEDS (environment) choose
# a part of the grid; finished runs are skipped, so a part can be added to later.
# Usage: [RATIOS="100 10"] [SEEDS=0,1,2] benchmarks/cifar10_lt_cpu.sh [CIFAR10_ROOT]
#        [extra compare arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-../shared/data/cifar10}
shift || true
for ratio in ${RATIOS:-100 10}; do
    .venv/bin/anchorlearn compare \
        configs/cifar10_lt/{ce,ce_sar,logit_adjusted,logit_adjusted_sar}.yaml \
        --seeds "${SEEDS:-0,1,2}" --jobs 2 --out "runs/cifar10_lt_cpu/ir$ratio" \
        --set "data.source=cifar10:$root" --set "data.imbalance_ratio=$ratio" \
        --set data.max_train_samples=10000 --set data.val_fraction=0.1 \
        --set trainer.max_epochs=10 --set optim.warmup_epochs=1 \
        --set data.batch_size=32 --set optim.lr=0.025 \
        --set "optim.milestones=[8, 9]" --set trainer.channels_last=true \
        --set trainer.progress=false --set eval.plots=false \
        --columns top1,balanced_acc,many,medium,few,nc1,train_seconds "$@"
done
