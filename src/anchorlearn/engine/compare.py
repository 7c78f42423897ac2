"""Grids of configs x seeds: run what is missing, then tabulate mean and std.

Each finished run writes ``metrics.json`` at once, so an interrupted grid keeps its rows and
the same command later completes it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import apply_overrides, load_config, parse_config

__all__ = ["DEFAULT_COLUMNS", "aggregate", "markdown_table", "run_grid", "write_results"]

DEFAULT_COLUMNS = ("top1", "balanced_acc", "many", "medium", "few", "nc1")


def run_grid(
    configs: Sequence[str | Path | tuple[str, dict]],
    seeds: Sequence[int],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    quiet: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Train every config with every seed under ``out/<name>/seed<k>``, skipping finished runs.

    A config is a YAML path or a ``(name, raw mapping)`` pair. Returns ``{name: [metrics per
    seed]}`` in config order.
    """
    from .runner import fit

    out = Path(out)
    results: dict[str, list[dict[str, Any]]] = {}
    for item in configs:
        for seed in seeds:
            cfg = _resolve(item, seed, overrides)
            run_dir = out / cfg.name / f"seed{seed}"
            done = run_dir / "metrics.json"
            if done.exists():
                metrics = json.loads(done.read_text())
                print(f"[compare] {cfg.name} seed {seed}: already done, kept")
            else:
                print(f"[compare] {cfg.name} seed {seed}: training -> {run_dir}")
                resume = (run_dir / "checkpoints" / "last.ckpt").exists()
                metrics = fit(cfg, run_dir, resume=resume, quiet=quiet)
                if metrics is None:  # a non-zero DDP rank
                    continue
                print(f"[compare] {cfg.name} seed {seed}: {_short(metrics)}")
            results.setdefault(cfg.name, []).append({"seed": seed, **metrics})
    return results


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
    keys = [k for k in ("top1", "balanced_acc", "few", "miou", "tail_iou") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)


def aggregate(results: dict[str, list[dict[str, Any]]], columns: Sequence[str]) -> list[dict]:
    """One row per method: mean and std over seeds of each scalar column."""
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"method": name, "seeds": len(runs)}
        for col in columns:
            values = [r[col] for r in runs if isinstance(r.get(col), int | float)]
            values = [v for v in values if not math.isnan(v)]
            row[col] = float(np.mean(values)) if values else float("nan")
            row[f"{col}_std"] = float(np.std(values)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


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
            elif row["seeds"] > 1:
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
        writer.writerow(["method", "seed", *columns])
        for name, runs in results.items():
            for r in runs:
                writer.writerow([name, r["seed"], *[r.get(c, "") for c in columns]])
    return table
