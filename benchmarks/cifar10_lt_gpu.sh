#!/usr/bin/env bash
# CIFAR-10-LT, the published recipe on a GPU (BENCHMARKS.md section 10): ResNet-32, 200
# epochs, batch 128, SGD 0.9, weight decay 2e-4, lr 0.1 with 5 warm-up epochs, x0.01 at
# epochs 160 and 180 (configs/cifar10_lt), IR 100, CE, CE + SAR, LA, LA + SAR and LDAM-DRW,
# seed 0 by default. Tables: $OUT/results.md (OUT defaults to runs/cifar10_lt_gpu).
# EPOCHS=N shortens the run with the milestones and the warm-up in proportion (EPOCHS=2
# ACCELERATOR=cpu checks the script on a CPU).
# Usage: [SEEDS=0] [EPOCHS=200] [ACCELERATOR=gpu] [OUT=DIR] benchmarks/cifar10_lt_gpu.sh [CIFAR10_ROOT]
#        [extra compare arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-../shared/data/cifar10}
shift || true
epochs=${EPOCHS:-200}
if ((epochs < 2)); then
    echo "EPOCHS must be at least 2 (the schedule needs a milestone inside the run)" >&2
    exit 2
fi
first=$((epochs * 160 / 200))
second=$((epochs * 180 / 200))
((first >= 1)) || first=1
((second > first)) || second=$((first + 1))
milestones="[$first]"
((second < epochs)) && milestones="[$first, $second]"
warmup=$((epochs * 5 / 200))
# LDAM-DRW re-weights from the first milestone: a copy of its config says so
out=${OUT:-runs/cifar10_lt_gpu}
mkdir -p "$out"
ldam=$out/ldam_drw.yaml
sed "s/drw_start_epoch: 160/drw_start_epoch: $first/" configs/cifar10_lt/ldam_drw.yaml >"$ldam"
grep -q "drw_start_epoch: $first\$" "$ldam"
.venv/bin/anchorlearn compare \
    configs/cifar10_lt/{ce,ce_sar,logit_adjusted,logit_adjusted_sar}.yaml "$ldam" \
    --seeds "${SEEDS:-0}" --out "$out" \
    --set "data.source=cifar10:$root" --set "trainer.accelerator=${ACCELERATOR:-gpu}" \
    --set "trainer.max_epochs=$epochs" --set "optim.milestones=$milestones" \
    --set "optim.warmup_epochs=$warmup" --set trainer.progress=false \
    --columns top1,many,medium,few,train_seconds "$@"
