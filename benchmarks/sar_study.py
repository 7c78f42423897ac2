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

``--grid DIR`` applies the same rule to a finished ``anchorlearn compare`` grid instead of a
study (every method folder under DIR; BENCHMARKS.md 11.3 at IR 10 and with ResNet-20; for a
segmentation grid, such as the composited scenes', the rule is the highest mean validation
mIoU, and the columns are mIoU and the tail classes' IoU), and
adds each run's per-seed test differences against ``--reference`` (same seed: same split,
initialisation and anchors):

    python benchmarks/sar_study.py --grid runs/fmnist_lt_sar10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from anchorlearn.engine.rundir import last_checkpoint
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
        evaluate_checkpoint(last_checkpoint(run), split="val", out=cached)
    return json.loads(cached.read_text())


@dataclass(frozen=True)
class Scores:
    """What a task's runs are chosen on (the validation split) and reported with (test)."""

    choose: str  # the validation metric of the rule
    choose_label: str
    group: str  # the rare-class column (validation and test)
    group_label: str
    overall: str  # the test column reported beside it
    overall_label: str
    rule: str  # the rule's words: the highest mean validation ...


CLASSIFICATION = Scores(
    "balanced_acc", "balanced acc", "few", "few", "top1", "top-1", "balanced accuracy"
)
# segmentation (the composited scenes): mean IoU, and the IoU of the rarer half of the classes
SEGMENTATION = Scores("miou", "mIoU", "tail_iou", "tail IoU", "miou", "mIoU", "IoU")


def scores_of(rows: dict[str, list[Path]]) -> Scores:
    """Segmentation scores if the runs' test metrics have a mean IoU, else classification."""
    first = json.loads((next(iter(rows.values()))[0] / "metrics.json").read_text())
    return SEGMENTATION if "miou" in first else CLASSIFICATION


def table(rows: dict[str, list[Path]], sc: Scores) -> tuple[str, str]:
    """The Markdown table, and the name of the row the rule chooses (the highest mean
    validation ``sc.choose``: balanced accuracy, or mean IoU for segmentation, among the
    rows with every seed)."""
    lines = [
        f"| run | seeds | val {sc.choose_label} | val {sc.group_label} "
        f"| test {sc.overall_label} | test {sc.group_label} |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        text = f"{100 * statistics.fmean(values):.2f}"
        return text + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")

    complete = max(len(runs) for runs in rows.values())
    chosen: dict[str, float] = {}
    for name, runs in rows.items():
        val = [val_metrics(r) for r in runs]
        test = [json.loads((r / "metrics.json").read_text()) for r in runs]
        seeds = ",".join(r.name.removeprefix("seed") for r in runs)
        if len(runs) == complete:
            chosen[name] = statistics.fmean(v[sc.choose] for v in val)
        lines.append(
            f"| {name} | {seeds} | {cell([v[sc.choose] for v in val])} "
            f"| {cell([v[sc.group] for v in val])} | {cell([t[sc.overall] for t in test])} "
            f"| {cell([t[sc.group] for t in test])} |"
        )
    return "\n".join(lines), max(chosen, key=chosen.__getitem__)


def differences(rows: dict[str, list[Path]], reference: str, sc: Scores) -> str:
    """Per-seed test differences (top-1 and few-shot; mIoU and tail IoU for segmentation)
    of every row against ``reference``, on the seeds both have (in points, signed)."""
    if reference not in rows:
        sys.exit(f"--reference {reference!r}: no finished runs (have: {', '.join(rows)})")

    def by_seed(runs: list[Path]) -> dict[str, dict]:
        return {r.name: json.loads((r / "metrics.json").read_text()) for r in runs}

    ref = by_seed(rows[reference])
    lines = [
        f"| run minus {reference} | seeds | {sc.overall_label} | {sc.group_label} |",
        "|---|---|---|---|",
    ]
    for name, runs in rows.items():
        if name == reference:
            continue
        mine = by_seed(runs)
        seeds = [s for s in ref if s in mine]
        if not seeds:
            continue
        overall, group = (
            " / ".join(f"{100 * (mine[s][key] - ref[s][key]):+.2f}" for s in seeds)
            for key in (sc.overall, sc.group)
        )
        shown = ",".join(s.removeprefix("seed") for s in seeds)
        lines.append(f"| {name} | {shown} | {overall} | {group} |")
    return "\n".join(lines)


def grid_methods(grid: Path) -> tuple[str, ...]:
    """The method folders of a compare grid: those holding a ``seed<k>/metrics.json``."""
    if not grid.is_dir():
        sys.exit(f"--grid {grid}: not a directory")
    return tuple(
        sorted(d.name for d in grid.iterdir() if d.is_dir() and any(d.glob("seed*/metrics.json")))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="ir10")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, help="default: runs/<the study's folder>")
    parser.add_argument("--baselines", type=Path, help="the main grid's runs (default: per study)")
    parser.add_argument("--no-train", action="store_true", help="only tabulate finished runs")
    parser.add_argument(
        "--grid", type=Path, help="choose among a finished compare grid's methods instead"
    )
    parser.add_argument(
        "--reference", default="sar_release", help="the row --grid differences are against"
    )
    args = parser.parse_args(argv)
    if args.grid is not None:
        if args.study != parser.get_default("study") or args.out or args.baselines:
            parser.error("--grid tabulates a finished grid: drop --study, --out, --baselines")
        sources = ((args.grid, grid_methods(args.grid)),)
    else:
        study = STUDIES[args.study]
        out = args.out or ROOT / "runs" / study.out
        baselines = args.baselines or ROOT / "runs" / study.baseline_runs
        if not args.no_train:
            train(study, out, args.seeds)
        sources = ((baselines, study.baselines), (out, tuple(study.variants)))
    seeds = [f"seed{s}" for s in args.seeds.split(",")]
    rows: dict[str, list[Path]] = {}
    for base, names in sources:
        for name in names:
            runs = [base / name / s for s in seeds if (base / name / s / "metrics.json").exists()]
            if runs:
                rows[name] = runs
    if not rows:
        sys.exit("no finished runs under " + " or ".join(str(base) for base, _ in sources))
    sc = scores_of(rows)
    text, chosen = table(rows, sc)
    print(text)
    print(f"\nchosen on validation (highest mean {sc.rule}): {chosen}")
    if args.grid is not None:
        print("\nPer seed, test split:\n")
        print(differences(rows, args.reference, sc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
