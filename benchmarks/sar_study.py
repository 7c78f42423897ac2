"""SAR's settings, chosen on validation: two studies.

``--study ir10`` (where SAR does not win): CE + SAR variants and longer CE / CE + SAR runs on
Fashion-MNIST-LT at IR 10, beside the 10-epoch baselines of the main IR 10 grid.

``--study variants`` (BENCHMARKS.md 11): at IR 100, the pull weight of the release's SAR and
of the class-balanced pull, the effective-number beta, and a margin that acts, beside the
release and the class-balanced pull of the 3-seed variant grid.

Trains through ``anchorlearn compare`` (which skips finished runs and resumes interrupted
ones), then scores every run on the *validation* split it held out (``anchorlearn eval
--split val``, cached as ``val_metrics.json`` in the run directory). The table has the
validation scores that the choice is made on, and the test scores beside them only to
report the chosen setting. The rule is fixed before any run: the highest mean validation
balanced accuracy (mean per-class accuracy, what the balanced test's top-1 estimates; the
few-shot group of a long-tailed validation split holds a few dozen images).

    OMP_NUM_THREADS=1 python benchmarks/sar_study.py --seeds 0,1
    OMP_NUM_THREADS=1 python benchmarks/sar_study.py --study variants --seeds 0,1,2 \\
        --baselines runs/fmnist_lt_sar100
    python benchmarks/sar_study.py --seeds 0,1 --no-train   # tabulate what exists
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from anchorlearn.engine.runner import evaluate_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Study:
    configs: str  # the folder under configs/
    overrides: tuple[str, ...]  # --set arguments for every trained variant
    # name -> (config, extra compare arguments)
    variants: dict[str, tuple[str, tuple[str, ...]]]
    baselines: tuple[str, ...]  # runs of the main grid, read from --baselines
    out: str  # default output and baseline folders, under runs/
    baseline_runs: str


STUDIES = {
    # at IR 10 with the small CNN
    "ir10": Study(
        configs="fmnist_lt",
        overrides=("--set", "data.imbalance_ratio=10"),
        variants={
            "ce_sar_pull0.3": ("ce_sar", ("--set", "losses.1.pull_weight=0.3")),
            "ce_sar_pull1": ("ce_sar", ("--set", "losses.1.pull_weight=1.0")),
            "ce_sar_ema0.99": ("ce_sar", ("--set", "losses.1.ema_momentum=0.99")),
            "ce_20ep": ("ce", ("--epochs", "20")),
            "ce_sar_20ep": ("ce_sar", ("--epochs", "20")),
        },
        baselines=("ce", "ce_ema_prototype", "ce_sar"),  # the main IR 10 grid, 10 epochs
        out="fmnist_lt10_sar_study",
        baseline_runs="fmnist_lt10",
    ),
    # at IR 100 (the configs' own ratio), small CNN, 10 epochs; each variant changes one
    # setting of the release or of the class-balanced pull (pull 0.1, beta 0.999)
    "variants": Study(
        configs="fmnist_lt_sar",
        overrides=(),
        variants={
            "sar_release_pull0.3": ("sar_release", ("--set", "losses.1.pull_weight=0.3")),
            "sar_class_balanced_pull0.3": (
                "sar_class_balanced",
                ("--set", "losses.1.pull_weight=0.3"),
            ),
            "sar_class_balanced_beta0.9999": (
                "sar_class_balanced",
                ("--set", "losses.1.class_weights=effective:0.9999"),
            ),
            "sar_class_balanced_pull1": (
                "sar_class_balanced",
                ("--set", "losses.1.pull_weight=1.0"),
            ),
            "sar_class_balanced_beta0.9999_pull0.3": (
                "sar_class_balanced",
                (
                    "--set",
                    "losses.1.class_weights=effective:0.9999",
                    "--set",
                    "losses.1.pull_weight=0.3",
                ),
            ),
            # the pull is about 0.25 at the end of training: a margin of 0.15 leaves the
            # features within it alone, where 0.05 never acted
            "sar_margin0.15": ("sar_margin_pull", ("--set", "losses.1.margin=0.15")),
        },
        baselines=("sar_release", "sar_class_balanced"),  # the 3-seed grid of section 11
        out="fmnist_lt_sar_study",
        baseline_runs="fmnist_lt_sar100",
    ),
}


def train(study: Study, out: Path, seeds: str) -> None:
    for name, (config, extra) in study.variants.items():
        config_path = ROOT / "configs" / study.configs / f"{config}.yaml"
        cmd = [
            sys.executable, "-m", "anchorlearn", "compare", str(config_path),
            "--seeds", seeds, "--out", str(out), *study.overrides,
            "--set", f"name={name}", "--set", "eval.plots=false",
            "--set", "trainer.progress=false", *extra,
        ]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def val_metrics(run: Path) -> dict:
    cached = run / "val_metrics.json"
    if not cached.exists():
        print(f"scoring {run} on its validation split", file=sys.stderr, flush=True)
        evaluate_checkpoint(run / "checkpoints" / "last.ckpt", split="val", out=cached)
    return json.loads(cached.read_text())


def table(rows: dict[str, list[Path]]) -> tuple[str, str]:
    """The Markdown table, and the name of the row the rule chooses (the highest mean
    validation balanced accuracy among the rows with every seed)."""
    lines = [
        "| run | seeds | val balanced acc | val few | test top-1 | test few |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        text = f"{100 * statistics.fmean(values):.2f}"
        return text + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")

    complete = max(len(runs) for runs in rows.values())
    scores: dict[str, float] = {}
    for name, runs in rows.items():
        val = [val_metrics(r) for r in runs]
        test = [json.loads((r / "metrics.json").read_text()) for r in runs]
        seeds = ",".join(r.name.removeprefix("seed") for r in runs)
        if len(runs) == complete:
            scores[name] = statistics.fmean(v["balanced_acc"] for v in val)
        lines.append(
            f"| {name} | {seeds} | {cell([v['balanced_acc'] for v in val])} "
            f"| {cell([v['few'] for v in val])} | {cell([t['top1'] for t in test])} "
            f"| {cell([t['few'] for t in test])} |"
        )
    return "\n".join(lines), max(scores, key=scores.__getitem__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="ir10")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, help="default: runs/<the study's folder>")
    parser.add_argument("--baselines", type=Path, help="the main grid's runs (default: per study)")
    parser.add_argument("--no-train", action="store_true", help="only tabulate finished runs")
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    out = args.out or ROOT / "runs" / study.out
    baselines = args.baselines or ROOT / "runs" / study.baseline_runs
    if not args.no_train:
        train(study, out, args.seeds)
    seeds = [f"seed{s}" for s in args.seeds.split(",")]
    rows: dict[str, list[Path]] = {}
    for base, names in ((baselines, study.baselines), (out, tuple(study.variants))):
        for name in names:
            runs = [base / name / s for s in seeds if (base / name / s / "metrics.json").exists()]
            if runs:
                rows[name] = runs
    if not rows:
        sys.exit(f"no finished runs under {out} or {baselines}")
    text, chosen = table(rows)
    print(text)
    print(f"\nchosen on validation (highest mean balanced accuracy): {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
