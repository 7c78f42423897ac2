"""Grids of configs x seeds: run what is missing, then tabulate mean and std.

Each finished run writes ``metrics.json`` at once, so an interrupted grid keeps its rows and
the same command later completes it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .config import load_config, parse_config
from .rundir import RunError, last_checkpoint, lock_run_dir
from .runner import fit
from .runs import check_finished_run
from .schema import apply_overrides, config_to_dict

__all__ = [
    "DEFAULT_COLUMNS",
    "SEGMENTATION_COLUMNS",
    "aggregate",
    "column_value",
    "markdown_table",
    "plot_comparison",
    "run_comparison",
    "run_grid",
    "select_columns",
    "tabulate",
    "write_results",
]

DEFAULT_COLUMNS = (
    "top1",
    "balanced_acc",
    "many",
    "medium",
    "few",
    "nc1",
    "intra_inter_ratio",
    "center_drift",
)
SEGMENTATION_COLUMNS = ("miou", "head_iou", "tail_iou", "nc1", "intra_inter_ratio", "center_drift")
# the fractions of metrics.json, tabulated as percentages (with per_class.<name>); every
# other column (times, steps, distances, cosines, the SAR gate's steps) as it is
FRACTION_COLUMNS = (
    "top1",
    "balanced_acc",
    "many",
    "medium",
    "few",
    "miou",
    "aacc",
    "macc",
    "head_iou",
    "tail_iou",
)


def is_fraction(column: str) -> bool:
    """Whether ``column`` holds a fraction, tabulated as a percentage."""
    return column in FRACTION_COLUMNS or column.startswith("per_class.")


def run_comparison(
    configs: Sequence[str | Path | tuple[str, dict]],
    seeds: Sequence[int],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    columns: Sequence[str] | None = None,
    quiet: bool = False,
    jobs: int = 1,
) -> str | None:
    """``anchorlearn compare``: :func:`run_grid`, then :func:`tabulate` its results into
    ``out``. ``out`` is locked throughout (the tables and plots too, not only the runs).

    Returns the Markdown table, or ``None`` when there is nothing to tabulate (no config,
    or a non-zero DDP rank).
    """
    with lock_run_dir(out):
        results = run_grid(configs, seeds, out, overrides=overrides, quiet=quiet, jobs=jobs)
        if not results:
            return None
        return tabulate(results, out, columns)


def _is_segmentation(results: dict[str, list[dict[str, Any]]]) -> bool:
    return "miou" in next(iter(results.values()))[0]


def select_columns(
    results: dict[str, list[dict[str, Any]]], requested: Sequence[str] | None = None
) -> list[str]:
    """The columns to tabulate: ``requested``, by default :data:`DEFAULT_COLUMNS` (or
    :data:`SEGMENTATION_COLUMNS` for runs with an ``miou``). A column is a metric some run
    has, ``center_drift``, or ``per_class.<name>`` for a class some run has; any other is a
    :class:`RunError` listing the available ones (the runs are kept)."""
    if requested:
        columns = list(requested)
    else:
        columns = list(SEGMENTATION_COLUMNS if _is_segmentation(results) else DEFAULT_COLUMNS)
    available = {key for runs in results.values() for run in runs for key in run}
    available = {k for k in available if k != "class_centers"} | {"center_drift"}
    available |= {
        f"per_class.{name}"
        for runs in results.values()
        for run in runs
        for name in run.get("per_class", {})
    }
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise RunError(
            f"--columns: no run has {unknown[0]!r} (the runs are kept; re-run to tabulate); "
            f"available: {', '.join(sorted(available))}"
        )
    return columns


def tabulate(
    results: dict[str, list[dict[str, Any]]],
    out: str | Path,
    columns: Sequence[str] | None = None,
) -> str:
    """Write the results of a grid into ``out``: ``results.md`` and ``results.csv``
    (:func:`write_results`) of the :func:`select_columns` (the fractions,
    :func:`is_fraction`, as percentages, every other column as it is) and the first seed's
    per-class accuracy or IoU of every method (``per_class_accuracy.png`` or
    ``per_class_iou.png``). Returns the table."""
    columns = select_columns(results, columns)
    percent = [c for c in columns if is_fraction(c)]
    table = write_results(results, out, columns, percent=percent)
    segmentation = _is_segmentation(results)
    plot_comparison(
        results,
        Path(out) / ("per_class_iou.png" if segmentation else "per_class_accuracy.png"),
        ylabel="IoU" if segmentation else "accuracy",
        title="test " + ("IoU" if segmentation else "accuracy") + " per class (first seed)",
    )
    return table


def run_grid(
    configs: Sequence[str | Path | tuple[str, dict]],
    seeds: Sequence[int],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    jobs: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Train every config with every seed under ``out/<name>/seed<k>``, skipping finished runs.

    Plots are written for the first seed of each config only.

    A config is a YAML path or a ``(name, raw mapping)`` pair. Returns ``{name: [metrics per
    seed]}`` in config order. A finished run is reused only if it was trained with the
    settings asked for now (its ``config.yaml``; only how it reported and where it ran may
    differ), and two configs of one grid may not share a name: either would put other
    runs' numbers in a row. ``jobs > 1`` trains that many runs at a time, each in its own
    single-thread ``anchorlearn fit`` process.

    ``out`` is locked while the grid runs (:func:`~.rundir.lock_run_dir`), and every run
    locks its own directory: a second ``compare`` into ``out``, or a ``fit`` into one of
    its run directories, is refused.
    """
    out = Path(out)
    grid = [[_resolve(item, seed, overrides) for seed in seeds] for item in configs]
    _check_unique_names(configs, [runs[0].name for runs in grid if runs])
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    with lock_run_dir(out):
        return _run_grid_locked(grid, seeds, out, quiet=quiet, jobs=jobs)


def _run_grid_locked(
    grid: list[list[Any]], seeds: Sequence[int], out: Path, *, quiet: bool, jobs: int
) -> dict[str, list[dict[str, Any]]]:
    pending = []
    for cfgs in grid:
        for cfg in cfgs:
            run_dir = out / cfg.name / f"seed{cfg.seed}"
            if (run_dir / "metrics.json").exists():
                check_finished_run(run_dir, config_to_dict(cfg), _normalised_config)
                print(f"[compare] {cfg.name} seed {cfg.seed}: already done, kept")
            else:
                pending.append((cfg, run_dir))
    if jobs == 1:
        for cfg, run_dir in pending:
            print(f"[compare] {cfg.name} seed {cfg.seed}: training -> {run_dir}")
            resume = last_checkpoint(run_dir).exists()
            # Pictures (t-SNE is slow on a CPU) for the first seed only.
            metrics = fit(cfg, run_dir, resume=resume, quiet=quiet, plots=cfg.seed == seeds[0])
            if metrics is None:  # a non-zero DDP rank
                return {}
            print(f"[compare] {cfg.name} seed {cfg.seed}: {_short(metrics)}")
    else:
        _run_in_processes(pending, jobs, first_seed=seeds[0])
    results: dict[str, list[dict[str, Any]]] = {}
    for cfgs in grid:
        for cfg in cfgs:
            done = out / cfg.name / f"seed{cfg.seed}" / "metrics.json"
            results.setdefault(cfg.name, []).append(
                {"seed": cfg.seed, **json.loads(done.read_text())}
            )
    return results


def _run_in_processes(pending: list, jobs: int, *, first_seed: int) -> None:
    """Train ``pending`` ``(config, run_dir)`` pairs in up to ``jobs`` processes of one
    thread each (``anchorlearn fit``), logging each to ``run_dir/fit.log``; on a CPU several
    single-thread processes often finish a grid sooner than one multi-thread process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue = list(pending)
    running: list[tuple[subprocess.Popen, Any, Path, Any]] = []
    failed = []
    while queue or running:
        while queue and len(running) < jobs:
            cfg, run_dir = queue.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            request = run_dir / "requested_config.yaml"
            request.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            command = [sys.executable, "-m", "anchorlearn", "fit", "--config", str(request)]
            command += ["--out", str(run_dir)]
            if last_checkpoint(run_dir).exists():
                command.append("--resume")
            if cfg.seed != first_seed:
                command.append("--no-plots")
            log = (run_dir / "fit.log").open("a")
            print(f"[compare] {cfg.name} seed {cfg.seed}: training -> {run_dir} (log: fit.log)")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, cfg, run_dir, log))
        time.sleep(1.0)
        for item in list(running):
            proc, cfg, run_dir, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            done = run_dir / "metrics.json"
            if proc.returncode == 0 and done.exists():
                metrics = json.loads(done.read_text())
                print(f"[compare] {cfg.name} seed {cfg.seed}: {_short(metrics)}")
            else:
                failed.append(
                    f"{cfg.name} seed {cfg.seed} (exit {proc.returncode}, see "
                    f"{run_dir / 'fit.log'})"
                )
    if failed:
        raise RunError("runs failed: " + "; ".join(failed) + "; finished runs are kept")


def _check_unique_names(configs: Sequence[Any], names: list[str]) -> None:
    seen: dict[str, Any] = {}
    for item, name in zip(configs, names, strict=True):
        label = item[0] if isinstance(item, tuple) else str(item)
        if name in seen:
            raise RunError(
                f"{seen[name]} and {label} are both named {name!r} and would share "
                f"{name}/seed<k>: change the `name:` in one of the files (a --set applies to "
                "every config) or compare them into different --out directories"
            )
        seen[name] = label


def _normalised_config(raw: dict) -> dict:
    """A stored ``config.yaml`` with every default filled in, comparable with a new one."""
    return config_to_dict(parse_config(raw))


def _resolve(item: str | Path | tuple[str, dict], seed: int, overrides: Sequence[str]):
    if isinstance(item, tuple):
        name, raw = item
        raw = json.loads(json.dumps(raw))
        raw["name"] = name
        apply_overrides(raw, list(overrides))
        cfg = parse_config(raw)
    else:
        cfg = load_config(item, list(overrides))
    cfg.seed = seed
    return cfg


def _short(metrics: dict[str, Any]) -> str:
    """The headline metrics; an undefined one (``null`` in ``metrics.json``) as ``n/a``."""
    keys = [k for k in ("top1", "balanced_acc", "few", "miou", "tail_iou") if k in metrics]
    return ", ".join(f"{k}=n/a" if metrics[k] is None else f"{k}={metrics[k]:.4f}" for k in keys)


def aggregate(results: dict[str, list[dict[str, Any]]], columns: Sequence[str]) -> list[dict]:
    """One row per method: mean and sample standard deviation (``ddof=1``) over seeds of
    each scalar column.

    The column ``center_drift`` is a property of a method across seeds, not of one run:
    :func:`anchorlearn.metrics.geometry.center_drift` of the seeds' test class centres
    (NaN with a single seed), so it has no standard deviation (NaN, printed without ±).
    """
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"method": name, "seeds": len(runs)}
        if "center_drift" in columns:
            row["center_drift"], row["center_drift_std"] = _drift(runs), float("nan")
        for col in columns:
            if col == "center_drift":
                continue
            values = [column_value(r, col) for r in runs]
            values = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
            row[col] = float(np.mean(values)) if values else float("nan")
            row[f"{col}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def column_value(run: dict[str, Any], column: str) -> Any:
    """A run's value of ``column``: a key of its metrics, or ``per_class.<class name>`` for
    one class's accuracy or IoU."""
    if column.startswith("per_class."):
        return run.get("per_class", {}).get(column.removeprefix("per_class."))
    return run.get(column)


def _drift(runs: list[dict[str, Any]]) -> float:
    """Centre drift over the classes every run has a centre for (a segmentation run's
    subsample of pixels may miss a class); runs without centres are left out."""
    from anchorlearn.metrics.geometry import center_drift

    runs = [r for r in runs if "class_centers" in r]
    if len(runs) < 2:
        return float("nan")
    labels = [r.get("class_center_labels", list(range(len(r["class_centers"])))) for r in runs]
    common = sorted(set(labels[0]).intersection(*labels[1:]))
    if len(common) < 2:
        return float("nan")
    centers = [
        torch.tensor(r["class_centers"])[[lab.index(c) for c in common]]
        for r, lab in zip(runs, labels, strict=True)
    ]
    return center_drift(centers)


def plot_comparison(
    results: dict[str, list[dict[str, Any]]], path: str | Path, *, ylabel: str, title: str
) -> Path:
    """Per-class values (accuracy or IoU) of every method side by side, first seed."""
    from anchorlearn.viz.plots import plot_per_class

    first = {name: runs[0] for name, runs in results.items()}
    class_names = list(next(iter(first.values()))["per_class"])
    values = {
        name: [np.nan if m["per_class"][c] is None else m["per_class"][c] for c in class_names]
        for name, m in first.items()
    }
    return plot_per_class(values, path, class_names=class_names, ylabel=ylabel, title=title)


def markdown_table(rows: list[dict], columns: Sequence[str], *, percent: Sequence[str] = ()) -> str:
    header = "| method | seeds | " + " | ".join(columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    lines = [header, sep]
    for row in rows:
        cells = []
        for col in columns:
            mean, std = row[col], row[f"{col}_std"]
            scale = 100.0 if col in percent else 1.0
            if math.isnan(mean):
                cells.append("n/a")
            elif row["seeds"] > 1 and not math.isnan(std):
                cells.append(f"{scale * mean:.2f} ± {scale * std:.2f}")
            else:
                cells.append(f"{scale * mean:.2f}")
        lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    results: dict[str, list[dict[str, Any]]],
    out: str | Path,
    columns: Sequence[str],
    *,
    percent: Sequence[str] = (),
) -> str:
    """Write ``results.md`` and ``results.csv`` (one row per run) into ``out``; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results, columns)
    table = markdown_table(rows, columns, percent=percent)
    (out / "results.md").write_text(table + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "seed", *[c for c in columns if c != "center_drift"]])
        for name, runs in results.items():
            for r in runs:
                cells = [column_value(r, c) for c in columns if c != "center_drift"]
                writer.writerow([name, r["seed"], *["" if v is None else v for v in cells]])
    return table
