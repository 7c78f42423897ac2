"""Pretrain the configs of configs/ssl with several seeds and tabulate the frozen evaluation.

Runs every config x seed under ``OUT/<name>/seed<k>`` (skipping runs that already have
``metrics.json`` if they were trained with the same settings; an interrupted run resumes
from its ``last.ckpt``), adds the floors of every seed (``--floors``: raw pixels and the
randomly initialised network, through the same evaluation, under ``OUT/floor_<kind>``) and
writes a Markdown table of means (and standard deviations over seeds) to ``--table``, with
per-seed paired differences (``--pairs pcl-moco,pauc-pcl``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssl_grid.py --seeds 0,1,2 --floors \\
        --out runs/ssl_grid --table runs/ssl_grid.md

``--val`` evaluates on a held-out fifth of the training images instead of the test images
(``data.val_fraction=0.2``): the split for choosing settings. ``--set key=value`` applies to
every config (e.g. ``--set optim.lr=0.06``); ``--jobs 2`` trains two runs at a time, each
in its own process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from anchorlearn.engine.rundir import last_checkpoint
from anchorlearn.engine.runs import check_finished_run
from anchorlearn.engine.ssl_config import (
    load_pretrain_config,
    parse_pretrain_config,
    pretrain_config_to_dict,
)

CONFIGS = [
    "moco",
    "moco_split_bn",
    "pcl",
    "pauc",
    "pauc_no_protonce",
    "pauc_view_align",
    "pauc_pair_align",
]
PAIRS = [
    "pcl-moco",
    "pauc-pcl",
    "pauc_no_protonce-pcl",
    "pauc_view_align-pcl",
    "pauc_pair_align-pcl",
    "moco_split_bn-moco",
]
FLOORS = {"pixels": "raw pixels", "random_init": "random init"}
VAL_FRACTION = 0.2
COLUMNS = [  # key, title, scale, decimals
    ("linear_probe", "linear probe %", 100.0, 1),
    ("low_shot_1", "1-shot %", 100.0, 1),
    ("low_shot_10", "10-shot %", 100.0, 1),
    ("low_shot_100", "100-shot %", 100.0, 1),
    ("knn", "kNN %", 100.0, 1),
    ("nmi", "NMI", 1.0, 3),
    ("ami", "AMI", 1.0, 3),
    ("alignment", "alignment (lower: closer views)", 1.0, 3),
    ("uniformity", "uniformity (lower: more uniform)", 1.0, 3),
    ("coagulation", "coagulation (lower: tighter clusters)", 1.0, 3),
    ("estep_share", "E-step share of epoch time %", 100.0, 1),
    ("train_seconds", "train s", 1.0, 0),
]
PAIRED_KEYS = ("linear_probe", "low_shot_1", "low_shot_10", "low_shot_100", "knn", "nmi")


def _settings(seed: int, overrides: list[str], val: bool) -> list[str]:
    return [f"seed={seed}", *overrides, *([f"data.val_fraction={VAL_FRACTION}"] if val else [])]


def _command(args: list[str]) -> None:
    """One CLI call in its own process (one thread, so two can share two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "anchorlearn.cli", *args]
    print("[ssl_grid] " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False)
    if done.returncode:
        raise SystemExit(f"[ssl_grid] failed ({done.returncode}): {' '.join(cmd[1:])}")


def run(
    config_dir: Path,
    names: list[str],
    seeds: list[int],
    out: Path,
    *,
    train: bool = True,
    overrides: list[str] | None = None,
    val: bool = False,
    floors: bool = False,
    jobs: int = 1,
) -> dict[str, list[dict]]:
    """Train what is missing (unless ``train`` is false: then unfinished runs are left out);
    return ``{name: [metrics per finished seed]}``, seeds in order, floors first."""
    overrides = list(overrides or [])
    tasks: list[tuple[str, int, Path, list[str]]] = []
    if floors:
        for kind in FLOORS:
            for seed in seeds:
                target = out / f"floor_{kind}" / f"seed{seed}.json"
                sets = [*_settings(seed, overrides, val), "eval.tsne=false"]
                config = str(config_dir / f"{names[0]}.yaml")
                flag = f"--{kind.replace('_', '-')}"
                args = ["probe", flag, "--config", config, "--out", str(target), *_as_sets(sets)]
                _check_floor_settings(target, args)
                tasks.append((f"floor_{kind}", seed, target, args))
    for name in names:
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            done = run_dir / "metrics.json"
            sets = _settings(seed, overrides, val)
            if done.exists():
                cfg = load_pretrain_config(config_dir / f"{name}.yaml", sets)
                check_finished_run(
                    run_dir,
                    pretrain_config_to_dict(cfg),
                    lambda raw: pretrain_config_to_dict(parse_pretrain_config(raw)),
                )
            args = ["pretrain", "--config", str(config_dir / f"{name}.yaml"), "--out"]
            args += [str(run_dir), "--no-plots", *_as_sets(sets)]
            if last_checkpoint(run_dir).exists():
                args.append("--resume")
            tasks.append((name, seed, done, args))
    pending = [task for task in tasks if not task[2].exists()]
    if train and pending:
        for task in pending:
            task[2].parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(lambda task: _command(task[3]), pending))
    results: dict[str, list[dict]] = {}
    for name, _seed, done, _args in tasks:
        if done.exists():
            results.setdefault(name, []).append(json.loads(done.read_text()))
    splits = {row.get("eval_split", "test") for rows in results.values() for row in rows}
    if len(splits) > 1:
        raise SystemExit(f"[ssl_grid] the runs in {out} mix evaluation splits {sorted(splits)}")
    return results


def _check_floor_settings(target: Path, args: list[str]) -> None:
    """A floor's metrics are reused only if they came from the same command: its arguments
    are kept beside them (``<seed>.args.json``)."""
    record = target.with_suffix(".args.json")
    if target.exists() and record.exists() and json.loads(record.read_text()) != args:
        raise SystemExit(
            f"[ssl_grid] {target} was computed with other settings ({record}): use another "
            "--out or delete it"
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        record.write_text(json.dumps(args))


def _as_sets(settings: list[str]) -> list[str]:
    return [item for setting in settings for item in ("--set", setting)]


def paired(results: dict[str, list[dict]], pairs: list[str]) -> str:
    """Per-seed differences ``a - b`` of the main columns for each ``"a-b"`` in ``pairs``
    (seeds both have), with their mean and standard deviation."""
    keys = [c for c in COLUMNS if c[0] in PAIRED_KEYS]
    lines = [
        "| difference | seeds | " + " | ".join(c[1] for c in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for pair in pairs:
        a, b = pair.split("-", 1)  # config names hold no "-" (configs/ssl uses "_")
        rows_a = {r["seed"]: r for r in results.get(a, [])}
        rows_b = {r["seed"]: r for r in results.get(b, [])}
        seeds = sorted(set(rows_a) & set(rows_b))
        if not seeds:
            continue
        cells = []
        for key, _, scale, decimals in keys:
            if any(rows[s].get(key) is None for rows in (rows_a, rows_b) for s in seeds):
                cells.append("-")
                continue
            diffs = [rows_a[s][key] - rows_b[s][key] for s in seeds]
            per_seed = ", ".join(f"{d * scale:+.{decimals}f}" for d in diffs)
            cells.append(f"{_cell(diffs, scale, decimals)} ({per_seed})")
        lines.append(f"| {a} - {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        name = FLOORS.get(name.removeprefix("floor_"), name) if name.startswith("floor_") else name
        name = f"{name} (n={len(rows)})"
        cells = [
            _cell([float(r[key]) for r in rows], scale, decimals)
            if all(r.get(key) is not None for r in rows)
            else "-"
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
    parser.add_argument(
        "--floors", action="store_true", help="add raw-pixel and random-init rows per seed"
    )
    parser.add_argument(
        "--val",
        action="store_true",
        help=f"evaluate on a held-out {VAL_FRACTION * 100:.0f} %% of the training images, "
        "not the test set",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of every config (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time")
    parser.add_argument(
        "--pairs", default=",".join(PAIRS), help="per-seed differences a-b (comma-separated)"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    began = time.perf_counter()
    results = run(
        args.config_dir,
        names,
        seeds,
        args.out,
        train=not args.no_train,
        overrides=args.overrides,
        val=args.val,
        floors=args.floors,
        jobs=args.jobs,
    )
    wall = time.perf_counter() - began
    body = table(results)
    pairs = [p for p in args.pairs.split(",") if p]
    if pairs:
        body += "\n\nPer-seed differences (mean ± std over seeds, then each seed):\n\n"
        body += paired(results, pairs)
    print(body)
    if args.table is not None:
        scored = "a held-out 20 % of the training images" if args.val else "the test set"
        header = [
            "# Prototypical contrastive SSL on Fashion-MNIST (small CNN)",
            "",
            f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}); wall time of this "
            f"invocation {wall / 60:.1f} min (0 when every run had finished before)",
            f"- seeds: {', '.join(map(str, seeds))}; date: {datetime.date.today().isoformat()}",
            f"- evaluated on: {scored}",
            f"- overrides: {' '.join(args.overrides) or 'none'}",
            "",
        ]
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n".join(header) + "\n" + body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
