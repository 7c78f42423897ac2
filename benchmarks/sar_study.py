"""Where SAR does not win: its settings and the training length, chosen on validation.

Trains (through ``anchorlearn compare``, which skips finished runs and resumes
interrupted ones) CE + SAR variants and longer CE / CE + SAR runs on Fashion-MNIST-LT
at IR 10, then scores every run, and the 10-epoch baselines of the main grid, on the
*validation* split each run held out (``anchorlearn eval --split val``, cached as
``val_metrics.json`` in the run directory). The table has the validation scores that the
choice is made on, and the test scores beside them only to report the chosen setting.

    OMP_NUM_THREADS=1 python benchmarks/sar_study.py --seeds 0,1
    python benchmarks/sar_study.py --seeds 0,1 --no-train   # tabulate what exists
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from anchorlearn.engine.runner import evaluate_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "fmnist_lt"

# name -> (config, extra compare arguments); all at IR 10 with the small CNN
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ce_sar_pull0.3": ("ce_sar", ["--set", "losses.1.pull_weight=0.3"]),
    "ce_sar_pull1": ("ce_sar", ["--set", "losses.1.pull_weight=1.0"]),
    "ce_sar_ema0.99": ("ce_sar", ["--set", "losses.1.ema_momentum=0.99"]),
    "ce_20ep": ("ce", ["--epochs", "20"]),
    "ce_sar_20ep": ("ce_sar", ["--epochs", "20"]),
}
BASELINES = ("ce", "ce_ema_prototype", "ce_sar")  # the main IR 10 grid, 10 epochs


def train(out: Path, seeds: str) -> None:
    for name, (config, extra) in VARIANTS.items():
        cmd = [
            sys.executable, "-m", "anchorlearn", "compare", str(CONFIGS / f"{config}.yaml"),
            "--seeds", seeds, "--out", str(out), "--set", "data.imbalance_ratio=10",
            "--set", f"name={name}", *extra,
        ]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def val_metrics(run: Path) -> dict:
    cached = run / "val_metrics.json"
    if not cached.exists():
        print(f"scoring {run} on its validation split", file=sys.stderr, flush=True)
        evaluate_checkpoint(run / "checkpoints" / "last.ckpt", split="val", out=cached)
    return json.loads(cached.read_text())


def table(rows: dict[str, list[Path]]) -> str:
    lines = [
        "| run | seeds | val balanced acc | val few | test top-1 | test few |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        text = f"{100 * statistics.fmean(values):.2f}"
        return text + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")

    for name, runs in rows.items():
        val = [val_metrics(r) for r in runs]
        test = [json.loads((r / "metrics.json").read_text()) for r in runs]
        seeds = ",".join(r.name.removeprefix("seed") for r in runs)
        lines.append(
            f"| {name} | {seeds} | {cell([v['balanced_acc'] for v in val])} "
            f"| {cell([v['few'] for v in val])} | {cell([t['top1'] for t in test])} "
            f"| {cell([t['few'] for t in test])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fmnist_lt10_sar_study")
    parser.add_argument("--baselines", type=Path, default=ROOT / "runs" / "fmnist_lt10")
    parser.add_argument("--no-train", action="store_true", help="only tabulate finished runs")
    args = parser.parse_args(argv)
    if not args.no_train:
        train(args.out, args.seeds)
    seeds = [f"seed{s}" for s in args.seeds.split(",")]
    rows: dict[str, list[Path]] = {}
    for base, names in ((args.baselines, BASELINES), (args.out, tuple(VARIANTS))):
        for name in names:
            runs = [base / name / s for s in seeds if (base / name / s / "metrics.json").exists()]
            if runs:
                rows[name] = runs
    if not rows:
        sys.exit(f"no finished runs under {args.out} or {args.baselines}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
