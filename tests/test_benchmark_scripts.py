"""The k-means benchmark script runs end to end on a small problem and prints its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_kmeans_speed_prints_the_timing_and_inertia_tables(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    args = ["--n", "3000", "--ks", "5", "--repeats", "1", "--inertia-seeds", "2"]
    args += ["--warm-starts", "0", "100", "--out", str(out)]
    script = ROOT / "benchmarks" / "kmeans_speed.py"
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    text = out.read_text()
    # the machine line names the CPU and faiss's build: faiss's speed depends on both
    assert "CPU cores" in text and "scikit-learn 1." in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("|")]
    methods = [cells[1].strip() for cells in rows if cells[0].strip() == "5"]
    assert "scikit-learn (greedy k-means++)" in methods
    assert "torch, default seeding and warm start" in methods
    inertia_rows = {cells[1].strip(): cells for cells in rows if len(cells) == 6}
    assert set(inertia_rows) >= {"torch, no warm start", "torch, warm start on 100·k rows"}
    for name in ("torch, no warm start", "torch, warm start on 100·k rows"):
        per_seed = [float(v) for v in inertia_rows[name][5].split()]
        assert len(per_seed) == 2
        # k-means from any seeding lands within a few percent of scikit-learn's on 5 clusters
        assert all(0.8 < v < 1.2 for v in per_seed)


def test_kmeans_speed_rejects_warm_starts_without_inertia_seeds() -> None:
    script = ROOT / "benchmarks" / "kmeans_speed.py"
    result = subprocess.run(
        [sys.executable, str(script), "--warm-starts", "3"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--warm-starts needs --inertia-seeds" in result.stderr


def test_seg_speed_times_both_variants_with_the_gate_open(tmp_path: Path) -> None:
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    args = ["--encoder", "hrnet_w18", "--size", "64", "--batch", "1", "--steps", "1"]
    args += ["--warmup", "1", "--classes", "5", "--infer-repeats", "1"]
    args += ["--out", str(out), "--json", str(raw)]
    script = ROOT / "benchmarks" / "seg_speed.py"
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    import json

    result = json.loads(raw.read_text())
    assert result["sar_gate_open_at_end"] is True
    assert result["feat_dim"] == 18 + 36 + 72 + 144
    assert set(result["step_seconds"]) == {"ce", "ce+sar"}
    assert all(t > 0 for t in result["step_seconds"].values())
    assert result["slide_images_per_second"] > 0
    assert "| hrnet_w18 (270) | 5 | 64² x 1 | fp32 |" in out.read_text()


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_ssl_grid_tabulates_floors_and_per_seed_differences() -> None:
    grid = _script("ssl_grid")

    def row(seed: int, probe: float, **extra) -> dict:
        return {"seed": seed, "linear_probe": probe, "knn": probe - 0.1, "nmi": 0.5, **extra}

    results = {
        "floor_pixels": [row(0, 0.80), row(1, 0.82)],
        "moco": [row(0, 0.84, estep_share=0.0), row(1, 0.86, estep_share=0.0)],
        "pcl": [row(0, 0.85, estep_share=0.2), row(1, 0.85, estep_share=0.2)],
    }
    text = grid.table(results)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert set(lines) == {"raw pixels (n=2)", "moco (n=2)", "pcl (n=2)"}
    assert "| 81.0 ± 1.4 |" in lines["raw pixels (n=2)"]
    # a column the floors do not have is a dash, not an error
    assert lines["raw pixels (n=2)"].split("|")[-4].strip() == "-"
    diffs = grid.paired(results, ["pcl-moco", "pauc-pcl"])
    body = [line for line in diffs.splitlines() if line.startswith("| pcl")]
    assert len(body) == 1 and "pauc" not in diffs  # a pair without runs is left out
    assert "0.0 ± 1.4 (+1.0, -1.0)" in body[0]


def test_ssl_grid_reuses_a_floor_only_from_the_same_command(tmp_path: Path) -> None:
    import pytest

    grid = _script("ssl_grid")
    target = tmp_path / "floor_pixels" / "seed0.json"
    grid._check_floor_settings(target, ["probe", "--pixels", "--set", "seed=0"])
    target.write_text("{}")
    grid._check_floor_settings(target, ["probe", "--pixels", "--set", "seed=0"])  # the same
    with pytest.raises(SystemExit, match="computed with other settings"):
        grid._check_floor_settings(target, ["probe", "--pixels", "--set", "data.val_fraction=0.2"])


def test_sar_study_chooses_on_validation_among_rows_with_every_seed(tmp_path: Path) -> None:
    import json

    study = _script("sar_study")
    # name -> per seed (val balanced acc, test top-1)
    scores = {
        "release": [(0.70, 0.74), (0.72, 0.75)],
        "best_on_test": [(0.69, 0.90), (0.70, 0.90)],  # the test split never chooses
        "best_on_val": [(0.75, 0.70), (0.73, 0.71)],
        "one_seed": [(0.99, 0.99)],  # unfinished: not a candidate
    }
    rows = {}
    for name, seeds in scores.items():
        rows[name] = []
        for seed, (val, test) in enumerate(seeds):
            run = tmp_path / name / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "val_metrics.json").write_text(json.dumps({"balanced_acc": val, "few": val}))
            (run / "metrics.json").write_text(json.dumps({"top1": test, "few": test}))
            rows[name].append(run)
    text, chosen = study.table(rows, study.CLASSIFICATION)
    assert chosen == "best_on_val"
    line = next(ln for ln in text.splitlines() if ln.startswith("| best_on_val |"))
    assert (
        line == "| best_on_val | 0,1 | 74.00 ± 1.41 | 74.00 ± 1.41 | 70.50 ± 0.71 | 70.50 ± 0.71 |"
    )
    assert set(study.STUDIES) == {"ir10", "variants"}
    for spec in study.STUDIES.values():  # every study trains configs that exist
        for config, _ in spec.variants.values():
            assert (ROOT / "configs" / spec.configs / f"{config}.yaml").is_file()


def _write_runs(root: Path, scores: dict, overall: str, group: str, choose: str) -> None:
    """Finished runs ``root/<name>/seed<k>``: per seed (validation score, test ``overall``,
    test ``group``); the validation file holds the score under ``choose`` and ``group``."""
    import json

    for name, seeds in scores.items():
        for seed, (val, test_overall, test_group) in enumerate(seeds):
            run = root / name / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "val_metrics.json").write_text(json.dumps({choose: val, group: val}))
            (run / "metrics.json").write_text(
                json.dumps({overall: test_overall, group: test_group})
            )


def test_sar_study_grid_chooses_among_a_compare_grid_with_per_seed_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _script("sar_study")
    # method -> per seed (val balanced acc, test top-1, test few)
    scores = {
        "sar_release": [(0.70, 0.74, 0.40), (0.72, 0.75, 0.50)],
        "sar_plus": [(0.74, 0.76, 0.45), (0.73, 0.74, 0.52)],
    }
    _write_runs(tmp_path, scores, "top1", "few", choose="balanced_acc")
    (tmp_path / "unfinished" / "seed0").mkdir(parents=True)  # no metrics.json: not a method
    assert study.grid_methods(tmp_path) == ("sar_plus", "sar_release")
    assert study.main(["--grid", str(tmp_path), "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "chosen on validation (highest mean balanced accuracy): sar_plus" in out
    assert "| sar_plus | 0,1 | +2.00 / -1.00 | +5.00 / +2.00 |" in out
    with pytest.raises(SystemExit, match="--reference 'ce'"):
        study.main(["--grid", str(tmp_path), "--seeds", "0,1", "--reference", "ce"])
    with pytest.raises(SystemExit):  # a grid is tabulated, not trained: no study options
        study.main(["--grid", str(tmp_path), "--study", "variants"])


def test_sar_study_grid_of_segmentation_runs_chooses_on_validation_miou(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _script("sar_study")
    # method -> per seed (val mIoU, test mIoU, test tail IoU)
    scores = {
        "ce_sar": [(0.30, 0.24, 0.07), (0.31, 0.33, 0.13)],
        "ce_sar_etf_anchors": [(0.28, 0.26, 0.12), (0.30, 0.33, 0.13)],  # better on test only
    }
    _write_runs(tmp_path, scores, "miou", "tail_iou", choose="miou")
    args = ["--grid", str(tmp_path), "--seeds", "0,1", "--reference", "ce_sar"]
    assert study.main(args) == 0
    out = capsys.readouterr().out
    assert "| run | seeds | val mIoU | val tail IoU | test mIoU | test tail IoU |" in out
    assert "chosen on validation (highest mean IoU): ce_sar\n" in out
    assert "| ce_sar_etf_anchors | 0,1 | +2.00 / +0.00 | +5.00 / +0.00 |" in out


def test_sar_gate_open_prints_a_row_per_gate_milestone() -> None:
    script = ROOT / "benchmarks" / "sar_gate_open.py"
    args = ["--steps", "20", "--classes", "10", "--seeds", "0", "--per-class", "20"]
    result = subprocess.run(
        [sys.executable, str(script), *args], check=True, capture_output=True, text=True
    )
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 10")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("all", "gate open"),
        ("per_class", "50 % open"),
        ("per_class", "90 % open"),
        ("per_class", "100 % open"),
    ]
    for cells in rows:
        step = cells[3].strip()
        assert step == "never" or 1 <= int(step) <= 20
    accuracy = float(rows[0][6])
    assert 0.0 <= accuracy <= 1.0


def test_sar_gate_open_triples_stack_one_item_of_each_class_of_the_triple(monkeypatch) -> None:
    import numpy as np

    gate = _script("sar_gate_open")

    def fake_fashion_mnist(split: str):
        # image i of class c is filled with 20 * c + (1 on the test split): its class and
        # split can be read back from any pixel
        labels = np.arange(200 if split == "train" else 100) % 10
        images = (20 * labels + (split == "test")).astype(np.uint8)[:, None, None]
        return np.broadcast_to(images, (len(labels), 28, 28)), labels

    monkeypatch.setattr(gate, "load_fashion_mnist", fake_fashion_mnist)
    x_train, y_train, x_test, y_test = gate.fmnist_triples(150, 4, seed=1)
    assert x_train.shape == (600, 3, 28, 28) and x_test.shape == (150 * 50, 3, 28, 28)
    assert torch.equal(y_train, torch.arange(150).repeat_interleave(4))
    for x, y, offset in ((x_train, y_train, 0), (x_test, y_test, 1)):
        items = (x[:, :, 0, 0].long() - offset) // 20  # (N, 3): the class of each channel
        assert torch.equal(x[:, :, 0, 0].long() % 20, torch.full_like(items, offset))
        # one triple per class, the same for every image of it, and 150 different triples
        triples = torch.stack([items[y == k][0] for k in range(150)])
        assert torch.equal(items, triples[y])
        assert len({tuple(t.tolist()) for t in triples}) == 150
    again = gate.fmnist_triples(150, 4, seed=1)
    other = gate.fmnist_triples(150, 4, seed=2)
    assert torch.equal(again[0], x_train) and not torch.equal(other[0], x_train)
    with pytest.raises(ValueError, match="1 to 1000 classes"):
        gate.fmnist_triples(1001, 4, seed=0)


def test_sar_gate_open_trains_on_fashion_mnist_triples() -> None:
    script = ROOT / "benchmarks" / "sar_gate_open.py"
    args = ["--data", "fmnist_triples", "--steps", "3", "--batch", "8", "--classes", "12"]
    args += ["--seeds", "0", "--per-class", "2"]
    result = subprocess.run(
        [sys.executable, str(script), *args], check=True, capture_output=True, text=True
    )
    assert "Fashion-MNIST items stacked in threes (2 train images per class)" in result.stdout
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 12")]
    assert [(r[1].strip(), r[2].strip()) for r in rows][:2] == [
        ("all", "gate open"),
        ("per_class", "50 % open"),
    ]
    assert 0.0 <= float(rows[0][6]) <= 1.0
    too_many = subprocess.run(
        [sys.executable, str(script), "--data", "fmnist_triples", "--classes", "1001"],
        capture_output=True,
        text=True,
    )
    assert too_many.returncode == 2 and "at most 1000 classes" in too_many.stderr


def test_the_cifar10_lt_gpu_script_runs_two_epochs_on_a_cpu(tmp_path: Path) -> None:
    """The GPU script checked as its docstring says: EPOCHS=2 ACCELERATOR=cpu, here on a
    tiny colour fixture; LDAM-DRW re-weights from the first (scaled) milestone."""
    import os

    from tests.data.cifarfixtures import make_cifar_batches

    root = make_cifar_batches(tmp_path / "cifar", per_class=2)
    out = tmp_path / "out"
    env = {**os.environ, "EPOCHS": "2", "ACCELERATOR": "cpu", "OUT": str(out)}
    env["OMP_NUM_THREADS"] = "1"
    extra = ["--set", "data.batch_size=16", "--set", "data.val_fraction=0.2"]
    extra += ["--set", "data.imbalance_ratio=2", "--set", "eval.plots=false"]
    script = ROOT / "benchmarks" / "cifar10_lt_gpu.sh"
    subprocess.run(
        ["bash", str(script), str(root), *extra], check=True, capture_output=True, env=env
    )
    assert "drw_start_epoch: 1\n" in (out / "ldam_drw.yaml").read_text()
    table = (out / "results.md").read_text()
    names = ["ce", "ce_sar", "logit_adjusted", "logit_adjusted_sar", "ldam_drw"]
    assert all(f"| {name} |" in table for name in names), table
    config = (out / "ce" / "seed0" / "config.yaml").read_text()
    assert "milestones:\n  - 1\n" in config and "max_epochs: 2" in config


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_script_prints_its_help(script: str) -> None:
    # argparse expands "%" in help texts: a stray one crashes --help only
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
