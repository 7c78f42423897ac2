"""kNN with and without standardised features, on the validation runs of the SSL search.

Re-evaluates the checkpoints that ``benchmarks/ssl_tune.sh`` wrote (seed 0, scored on the
held-out fifth of the training images) and the floors of the same settings, once with the
features as they are and once standardised per dimension with the training features'
statistics (``eval.knn_standardize``), and prints the kNN accuracy of each (BENCHMARKS.md
section 4.1). The raw-pixel floor is standardised either way.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssl_knn_standardize.py [--tune runs/ssl_tune]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anchorlearn.models  # noqa: F401  (the torchvision shim before Lightning)
from anchorlearn.engine.rundir import last_checkpoint
from anchorlearn.engine.runs import restore_run
from anchorlearn.engine.ssl_config import parse_pretrain_config
from anchorlearn.engine.ssl_evaluate import evaluate_pretrained
from anchorlearn.engine.ssl_runner import (
    PRETRAIN_CONFIG_KEY,
    build_pretrain_run,
    load_pretrain_checkpoint,
    probe_floor,
)

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("grid3/moco", "grid3/pcl", "grid2/moco")  # ssl_tune.sh's pooling-grid rows
FLOORS = ((3, "random_init"), (3, "pixels"), (1, "random_init"))


def _checkpoint_knn(path: Path) -> dict[bool, float]:
    ckpt = load_pretrain_checkpoint(path)
    cfg = parse_pretrain_config(ckpt[PRETRAIN_CONFIG_KEY])
    dm, module = restore_run(
        ckpt, path, lambda: build_pretrain_run(cfg), action="probe", allow_data_change=False
    )
    cfg.eval.low_shot, cfg.eval.tsne = [], False
    result = {}
    for flag in (False, True):
        cfg.eval.knn_standardize = flag
        result[flag] = evaluate_pretrained(module, dm, cfg)["knn"]
    return result


def _floor_knn(grid: int, kind: str) -> dict[bool, float]:
    sets = ["data.val_fraction=0.2", "eval.low_shot=[]", "eval.tsne=false"]
    sets.append(f"model.kwargs.pool_grid={grid}")
    config = ROOT / "configs" / "ssl" / "moco.yaml"
    return {
        flag: probe_floor(
            config, kind, overrides=[*sets, f"eval.knn_standardize={str(flag).lower()}"]
        )["knn"]
        for flag in (False, True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", default="runs/ssl_tune", help="ssl_tune.sh's output folder")
    args = parser.parse_args()
    print("| encoder (validation images, seed 0) | kNN % as is | kNN % standardised |")
    print("|---|---|---|")
    for name in RUNS:
        path = last_checkpoint(Path(args.tune) / name / "seed0")
        if not path.exists():
            print(f"| {name} | (no checkpoint at {path}) | |", flush=True)
            continue
        knn = _checkpoint_knn(path)
        print(f"| {name} | {100 * knn[False]:.1f} | {100 * knn[True]:.1f} |", flush=True)
    for grid, kind in FLOORS:
        knn = _floor_knn(grid, kind)
        label = f"{kind}, {grid}x{grid} grid" if kind != "pixels" else "raw pixels"
        print(f"| {label} | {100 * knn[False]:.1f} | {100 * knn[True]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
