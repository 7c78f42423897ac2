#!/usr/bin/env bash
# The search on the validation split behind configs/ssl (BENCHMARKS.md section 4): seed 0,
# each setting scored on a held-out fifth of the 6,000 training images (1,200 images), never
# on the test set. Each line is a change from the shipped configs; one run takes 3 to 4
# minutes on one core (resnet20: about 12). Tables: runs/ssl_tune/<setting>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
grid() {
    local out=$1
    shift
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssl_grid.py --seeds 0 --val \
        --out "runs/ssl_tune/$out" --table "runs/ssl_tune/$out.md" "$@"
}
pauc_terms() { for t in align uniform corr; do echo "--set loss.${t}_weight=$1"; done; }

# The rows up to pauc1 were run with global pooling (model.kwargs.pool_grid=1), the setting
# of the time; the pooling grid rows at the end chose the shipped 3x3 grid.
g1() { local out=$1; shift; grid "$out" --set model.kwargs.pool_grid=1 "$@"; }
g1 crop0.5 --configs moco,pcl --floors
g1 crop0.2 --configs moco --set data.crop_min_scale=0.2     # MoCo v2's crop
g1 crop0.8 --configs moco --set data.crop_min_scale=0.8
g1 crop0.2_lr0.06 --configs moco --set data.crop_min_scale=0.2 --set optim.lr=0.06
g1 crop0.2_split_bn4 --configs moco --set data.crop_min_scale=0.2 --set model.split_bn=4
g1 epochs32 --configs moco --set trainer.max_epochs=32
g1 wide --configs moco --set model.kwargs.width=32 --set model.kwargs.feat_dim=128
g1 t0.1 --configs moco --set model.temperature=0.1
g1 queue1024 --configs moco --set model.queue_size=1024
g1 n24k_epochs4 --configs moco --floors --set data.max_train_samples=24000 \
    --set trainer.max_epochs=4
grid resnet20 --configs moco --floors --set model.name=resnet20 --set 'model.kwargs={}'
# PAUC's three term weights together (the shipped 0.1, and 1)
g1 pauc0.1 --configs pauc
# shellcheck disable=SC2046
g1 pauc1 --configs pauc $(pauc_terms 1.0)
# the pooling grid of small_cnn's last map (features 64 x g x g): 2x2, 3x3 (shipped)
grid grid2 --configs moco --floors --set model.kwargs.pool_grid=2
grid grid3 --configs moco,pcl --floors --set model.kwargs.pool_grid=3
grid grid3_crop0.8 --configs moco --set model.kwargs.pool_grid=3 --set data.crop_min_scale=0.8
