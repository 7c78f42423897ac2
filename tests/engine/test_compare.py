"""`compare`: grids of configs x seeds (finished runs kept only with the same settings,
parallel jobs), the table (sample std, centre drift, per-class columns) and its columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tests.engine.runfixtures import digits_config

from anchorlearn.cli import main
from anchorlearn.engine.compare import (
    DEFAULT_COLUMNS,
    SEGMENTATION_COLUMNS,
    aggregate,
    markdown_table,
    run_grid,
    select_columns,
    tabulate,
    write_results,
)
from anchorlearn.engine.rundir import RunError
from anchorlearn.metrics.geometry import center_drift


def test_compare_keeps_finished_runs(tmp_path: Path, capsys) -> None:

    configs = [
        ("ce", digits_config(losses=["ce"], trainer={"max_epochs": 1, "progress": False})),
        ("ce_sar", digits_config(trainer={"max_epochs": 1, "progress": False})),
    ]
    results = run_grid(configs, [0, 1], tmp_path)
    table = write_results(results, tmp_path, ["top1", "nc1"], percent=["top1"])
    assert table.count("\n") == 3 and "| ce_sar | 2 |" in table
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    capsys.readouterr()
    # how a run reported is not a setting of the run: it is reused
    again = run_grid(configs, [0, 1], tmp_path, overrides=["trainer.progress=true"])
    assert capsys.readouterr().out.count("already done") == 4
    assert again["ce"][1]["top1"] == results["ce"][1]["top1"]
    # other settings are: the finished 1-epoch runs used to be kept as if they had them
    with pytest.raises(RunError, match=r"ce/seed0 is a finished run .*max_epochs: 1 -> 3"):
        run_grid(configs, [0, 1], tmp_path, overrides=["trainer.max_epochs=3"])
    with pytest.raises(RunError, match=r"data\.imbalance_ratio: 10\.0 -> 1\.0"):
        run_grid(configs, [0], tmp_path, overrides=["data.imbalance_ratio=1"])


def test_compare_refuses_two_configs_with_one_name(tmp_path: Path) -> None:

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump(digits_config()))
    second.write_text(yaml.safe_dump(digits_config(losses=["ce"])))
    with pytest.raises(RunError, match=r"a\.yaml and .*b\.yaml are both named 'digits'"):
        run_grid([first, second], [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_table_uses_the_sample_std_and_drift_has_none() -> None:

    centers = [[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.1]], [[0.1, 1.0], [1.0, 0.0]]]
    runs = [
        {"seed": s, "top1": v, "class_centers": centers[s]} for s, v in enumerate([0.1, 0.2, 0.6])
    ]
    rows = aggregate({"m": runs}, ["top1", "center_drift"])
    assert rows[0]["top1"] == pytest.approx(0.3)
    # sample std of 0.1, 0.2, 0.6: sqrt((0.04 + 0.01 + 0.09) / 2); np.std's default gives 0.216
    assert rows[0]["top1_std"] == pytest.approx(0.26458, abs=1e-5)
    table = markdown_table(rows, ["top1", "center_drift"], percent=["top1"])
    assert "| m | 3 | 30.00 ± 26.46 | " in table
    assert table.rstrip().endswith("|") and table.splitlines()[-1].count("±") == 1


def test_center_drift_compares_the_classes_every_seed_has() -> None:

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    # seed 1's subsample missed class 1, seed 2's missed class 2: rows 1 and 2 are other classes
    runs = [
        {"class_centers": a.tolist(), "class_center_labels": [0, 1, 2, 3]},
        {"class_centers": b[[0, 2, 3]].tolist(), "class_center_labels": [0, 2, 3]},
        {"class_centers": a[[0, 1, 3]].tolist(), "class_center_labels": [0, 1, 3]},
    ]
    expected = center_drift([a[[0, 3]], b[[0, 3]], a[[0, 3]]])
    assert aggregate({"m": runs}, ["center_drift"])[0]["center_drift"] == pytest.approx(expected)
    # runs written before the labels were recorded hold every class
    legacy = [{"class_centers": a.tolist()}, {"class_centers": b.tolist()}]
    assert aggregate({"m": legacy}, ["center_drift"])[0]["center_drift"] == pytest.approx(
        center_drift([a, b])
    )


def test_compare_jobs_trains_in_processes_with_the_same_results(tmp_path: Path, capsys) -> None:

    configs = [("ce", digits_config(losses=["ce"], trainer={"max_epochs": 1, "progress": False}))]
    here = run_grid(configs, [0, 1], tmp_path / "here")
    parallel = run_grid(configs, [0, 1], tmp_path / "parallel", jobs=2)
    assert [r["top1"] for r in parallel["ce"]] == [r["top1"] for r in here["ce"]]
    assert (tmp_path / "parallel" / "ce" / "seed1" / "fit.log").stat().st_size > 0
    assert (tmp_path / "parallel" / "ce" / "seed0" / "plots" / "tsne.png").exists()
    assert not (tmp_path / "parallel" / "ce" / "seed1" / "plots").exists()
    bad = [("broken", digits_config(model={"name": "small_cnn", "kwargs": {"width": -1}}))]
    with pytest.raises(RunError, match=r"broken seed 0 \(exit 2, see .*fit\.log\)"):
        run_grid(bad, [0], tmp_path / "bad", jobs=2)


def test_compare_tabulates_one_class_with_a_per_class_column(tmp_path: Path) -> None:

    runs = {
        "a": [
            {"seed": 0, "top1": 0.5, "per_class": {"cat": 0.25, "dog": None}},
            {"seed": 1, "top1": 0.7, "per_class": {"cat": 0.75, "dog": 0.5}},
        ]
    }
    row = aggregate(runs, ["per_class.cat", "per_class.dog"])[0]
    assert row["per_class.cat"] == pytest.approx(0.5)
    assert row["per_class.dog"] == pytest.approx(0.5)  # the seed without a value is left out
    write_results(runs, tmp_path, ["top1", "per_class.cat"], percent=["top1", "per_class.cat"])
    assert "| a | 2 | 60.00 ± 14.14 | 50.00 ± 35.36 |" in (tmp_path / "results.md").read_text()
    assert "a,1,0.7,0.75" in (tmp_path / "results.csv").read_text()


def test_cli_compare_unknown_column_is_one_line_and_keeps_the_runs(tmp_path: Path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config(losses=["ce"], trainer={"max_epochs": 1})))
    args = ["compare", str(config), "--seeds", "0", "--out", str(tmp_path / "grid")]
    assert main([*args, "--columns", "top1,bogus"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the training's output
    assert last.startswith("anchorlearn: error: --columns: no run has 'bogus'")
    assert "balanced_acc" in last and "center_drift" in last
    assert (tmp_path / "grid" / "digits" / "seed0" / "metrics.json").is_file()
    assert main([*args, "--columns", "top1,center_drift"]) == 0
    assert "already done" in capsys.readouterr().out


def test_columns_default_to_the_task_and_unknown_ones_list_what_there_is() -> None:
    # every default column but center_drift, which the table computes across seeds
    classification = {
        "a": [{**dict.fromkeys(DEFAULT_COLUMNS[:-1], 0.5), "per_class": {"cat": 0.5}}]
    }
    segmentation = {"a": [{**dict.fromkeys(SEGMENTATION_COLUMNS[:-1], 0.4), "class_centers": []}]}
    assert select_columns(classification) == list(DEFAULT_COLUMNS)
    assert select_columns(segmentation) == list(SEGMENTATION_COLUMNS)
    assert select_columns(classification, ["per_class.cat", "few"]) == ["per_class.cat", "few"]
    # a segmentation run has no top1; class centres are drift's input, not a column
    for column in ("top1", "class_centers"):
        with pytest.raises(RunError) as err:
            select_columns(segmentation, ["miou", column])
        assert str(err.value) == (
            f"--columns: no run has {column!r} (the runs are kept; re-run to tabulate); "
            "available: center_drift, head_iou, intra_inter_ratio, miou, nc1, tail_iou"
        )
    with pytest.raises(RunError, match="no run has 'balanced_acc'"):  # the defaults too
        select_columns({"a": [{"top1": 0.5}]})


def test_tabulate_writes_percentages_except_the_unitless_columns(tmp_path: Path) -> None:
    runs = {
        "a": [
            {"seed": 0, "top1": 0.5, "nc1": 0.25, "per_class": {"cat": 0.5, "dog": 0.25}},
            {"seed": 1, "top1": 0.7, "nc1": 0.75, "per_class": {"cat": 0.75, "dog": 0.5}},
        ]
    }
    table = tabulate(runs, tmp_path, ["top1", "nc1"])
    assert table.splitlines()[-1] == "| a | 2 | 60.00 ± 14.14 | 0.50 ± 0.35 |"
    assert (tmp_path / "results.md").read_text() == table + "\n"
    assert (tmp_path / "per_class_accuracy.png").stat().st_size > 0


def test_only_fractions_become_percentages(tmp_path: Path) -> None:
    """Times, steps and distances are tabulated as they are; accuracies (and one class's)
    as percentages."""
    runs = {
        "a": [
            {
                "seed": 0,
                "top1": 0.5,
                "train_seconds": 472.0,
                "sar_gate_open_step": 12,
                "intra": 3.5,
                "per_class": {"cat": 0.25},
            }
        ]
    }
    columns = ["top1", "train_seconds", "sar_gate_open_step", "intra", "per_class.cat"]
    table = tabulate(runs, tmp_path, columns)
    assert table.splitlines()[-1] == "| a | 1 | 50.00 | 472.00 | 12.00 | 3.50 | 25.00 |"
