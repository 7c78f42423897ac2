"""The embedded demo, shrunk to a few hundred images and one epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

from anchorlearn.data.fashion_mnist import find_fashion_mnist


def _have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist("train")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not installed (make data)")
def test_demo_trains_three_methods_and_writes_a_report(tmp_path: Path) -> None:
    from anchorlearn.engine.demo import DEMO_METHODS, run_demo

    table = run_demo(
        tmp_path,
        epochs=1,
        overrides=("data.max_train_samples=1500", "trainer.progress=false"),
    )
    for name in DEMO_METHODS:
        assert f"| {name} | 1 |" in table
        assert (tmp_path / name / "seed0" / "metrics.json").exists()
        assert (tmp_path / name / "seed0" / "plots" / "tsne.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "IR 100" in report and table in report
    assert (tmp_path / "per_class_accuracy.png").stat().st_size > 0
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + len(DEMO_METHODS)
