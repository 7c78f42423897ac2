"""Pretrain the configs of configs/ssl with several seeds and tabulate the frozen evaluation.

Runs every config x seed under ``OUT/<name>/seed<k>`` (skipping runs that already have
``metrics.json`` if they were trained with the same settings; an interrupted run resumes
from its ``last.ckpt``) and writes a Markdown
table of means (and standard deviations over seeds) to ``--table``::

    nice -n 10 .venv/bin/python benchmarks/ssl_grid.py --seeds 0 \\
        --out runs/ssl_grid --table runs/ssl_grid.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from anchorlearn.engine.runs import check_finished_run
from anchorlearn.engine.ssl_config import (
    load_pretrain_config,
    parse_pretrain_config,
    pretrain_config_to_dict,
)
from anchorlearn.engine.ssl_runner import pretrain

CONFIGS = ["moco", "pcl", "pauc", "pcl_align", "pcl_uniform", "pcl_corr"]
COLUMNS = [  # key, title, scale, decimals
    ("linear_probe", "linear probe %", 100.0, 1),
    ("knn", "kNN %", 100.0, 1),
    ("nmi", "NMI", 1.0, 3),
    ("alignment", "alignment (lower: closer views)", 1.0, 3),
    ("uniformity", "uniformity (lower: more uniform)", 1.0, 3),
    ("coagulation", "coagulation (lower: tighter clusters)", 1.0, 3),
    ("estep_share", "E-step share of epoch time %", 100.0, 1),
    ("train_seconds", "train s", 1.0, 0),
]


def run(
    config_dir: Path, names: list[str], seeds: list[int], out: Path, train: bool = True
) -> dict[str, list[dict]]:
    """Train what is missing (unless ``train`` is false: then unfinished runs are left out);
    return ``{name: [metrics per finished seed]}``."""
    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            done = run_dir / "metrics.json"
            if not done.exists() and not train:
                continue
            cfg = load_pretrain_config(config_dir / f"{name}.yaml", [f"seed={seed}"])
            if done.exists():
                check_finished_run(
                    run_dir,
                    pretrain_config_to_dict(cfg),
                    lambda raw: pretrain_config_to_dict(parse_pretrain_config(raw)),
                )
            else:
                resume = (run_dir / "checkpoints" / "last.ckpt").exists()
                print(f"[ssl_grid] {name} seed {seed} -> {run_dir}", flush=True)
                pretrain(cfg, run_dir, resume=resume)
            results.setdefault(name, []).append(json.loads(done.read_text()))
    return results


def _cell(values: list[float], scale: float, decimals: int) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {statistics.stdev(values) * scale:.{decimals}f}"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown table, one row per config."""
    lines = [
        "| config | " + " | ".join(column[1] for column in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, rows in results.items():
        name = f"{name} (n={len(rows)})"
        cells = [
            _cell([float(r[key]) for r in rows], scale, decimals)
            for key, _, scale, decimals in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--config-dir", default="configs/ssl", type=Path)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--out", default="runs/ssl_grid", type=Path)
    parser.add_argument("--table", default=None, type=Path, help="write the Markdown here")
    parser.add_argument(
        "--no-train", action="store_true", help="tabulate the finished runs only, train nothing"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = run(args.config_dir, names, seeds, args.out, train=not args.no_train)
    body = table(results)
    print(body)
    if args.table is not None:
        header = [
            "# Prototypical contrastive SSL on Fashion-MNIST (small CNN)",
            "",
            f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), shared with other "
            "jobs; timings are indicative only",
            f"- seeds: {', '.join(map(str, seeds))}; date: {datetime.date.today().isoformat()}",
            "- configs: configs/ssl/*.yaml (6k training images, 2k test images, batch 256, "
            "6 epochs, 1 warm-up epoch, k = [20, 50], queue 4096)",
            "",
        ]
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n".join(header) + "\n" + body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
