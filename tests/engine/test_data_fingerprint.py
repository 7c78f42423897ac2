"""Data fingerprints: stored by `fit` and `pretrain`, checked by `eval`, `probe` and
`--resume`, so that a run is never scored or continued on data other than its own."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests.engine.runfixtures import COUNTS, npz_config, write_npz

from anchorlearn.cli import main
from anchorlearn.engine.config import parse_config
from anchorlearn.engine.runner import RunError, build_run, evaluate_checkpoint, fit

KEY = "anchorlearn_data_fingerprint"


def _sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes one after the other (the documented content hash)."""
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def _permuted(path: Path) -> Path:
    """Re-save the ``.npz`` with the same rows in another order."""
    order = np.random.default_rng(1).permutation(sum(COUNTS))
    return write_npz(path, order=order)


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("anchorlearn:")]
    assert len(lines) == 1, text
    return lines[0]


def test_fit_stores_the_fingerprint_of_the_data_it_read(tmp_path: Path) -> None:
    cfg = parse_config(npz_config(write_npz(tmp_path / "d.npz")))
    fit(cfg, tmp_path / "run", quiet=True, plots=False)
    stored = json.loads((tmp_path / "run" / "data_fingerprint.json").read_text())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt[KEY] == stored
    assert stored["source"] == f"npz:{tmp_path / 'd.npz'}" and stored["kind"] == "arrays"
    dm, _ = build_run(cfg)
    for split in ("train", "val", "test"):
        images, labels = dm.dataset(split).tensors
        assert stored["splits"][split] == {
            "samples": len(labels),
            "image_shape": [1, 8, 8],
            "content_sha256": _sha256(images, labels),
        }
    assert sum(s["samples"] for s in stored["splits"].values()) == sum(COUNTS)
    assert len(stored["split_indices_sha256"]) == 64


def test_eval_and_resume_refuse_a_permuted_npz(tmp_path: Path, capsys) -> None:
    # the case: the same rows saved in another order put former training images
    # into the test split
    data = write_npz(tmp_path / "d.npz")
    raw = npz_config(data)
    run = tmp_path / "run"
    fit(parse_config(raw), run, quiet=True, plots=False)
    last = run / "checkpoints" / "last.ckpt"
    before = evaluate_checkpoint(last)
    _permuted(data)
    with pytest.raises(RunError) as err:
        evaluate_checkpoint(last)
    message = str(err.value)
    assert message.startswith(
        f"the test, val and train splits of npz:{data} now hold different images or labels "
        "than when the run trained (test content hash "
    )
    assert message.endswith(
        ": the data changed; pass --allow-data-change (allow_data_change=True) to evaluate anyway"
    )
    capsys.readouterr()
    after = evaluate_checkpoint(last, allow_data_change=True)
    assert after["top1"] != before["top1"] or after["nc1"] != before["nc1"]
    assert "warning: the test, val and train splits of" in capsys.readouterr().err
    # the command line says the same in one line, and takes the flag
    assert main(["eval", "--checkpoint", str(last)]) == 2
    assert "--allow-data-change" in _one_line(capsys.readouterr().err)
    assert main(["eval", "--checkpoint", str(last), "--allow-data-change"]) == 0
    # resuming on other data is refused before any training
    stamp = last.stat().st_mtime_ns
    longer = parse_config({**raw, "trainer": {**raw["trainer"], "max_epochs": 2}})
    with pytest.raises(RunError, match=r"to resume anyway$"):
        fit(longer, run, resume=True, quiet=True, plots=False)
    assert last.stat().st_mtime_ns == stamp
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(npz_config(data, max_epochs=2)))
    args = ["fit", "--config", str(config), "--out", str(run), "--resume", "--no-plots"]
    assert main(args) == 2
    assert "to resume anyway" in _one_line(capsys.readouterr().err)
    assert main([*args, "--allow-data-change"]) == 0
    stored = json.loads((run / "data_fingerprint.json").read_text())
    assert torch.load(last, weights_only=True)[KEY] == stored  # now the data it last read
    capsys.readouterr()
    evaluate_checkpoint(last)  # no longer a mismatch
    assert "warning" not in capsys.readouterr().err


def test_a_checkpoint_without_a_fingerprint_is_evaluated_with_a_warning(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    fit(parse_config(npz_config(write_npz(tmp_path / "d.npz"))), run, quiet=True, plots=False)
    last = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    evaluate_checkpoint(last)
    assert "fingerprint" not in capsys.readouterr().err
    ckpt = torch.load(last, weights_only=True)
    del ckpt[KEY]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert 0.0 <= evaluate_checkpoint(old)["top1"] <= 1.0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "fingerprint" in line]
    assert warnings == [
        f"warning: {old} holds no data fingerprint (written before they were stored): the "
        "data cannot be checked against the data the run trained on"
    ]


def test_segmentation_file_sets_are_fingerprinted_by_paths_and_sizes(
    tmp_path: Path, monkeypatch
) -> None:
    from PIL import Image
    from tests.data.segfixtures import make_camvid

    from anchorlearn.engine.rundir import fingerprint_differences
    from anchorlearn.engine.segmentation import SegmentationFilesDataModule

    root = make_camvid(tmp_path)
    dm = SegmentationFilesDataModule(f"camvid:{root}", crop_size=(32, 48))

    def no_reading(*args, **kwargs):
        raise AssertionError("the fingerprint must not read the pixels")

    monkeypatch.setattr(Image, "open", no_reading)
    stored = dm.data_fingerprint()
    assert stored["kind"] == "files" and stored["source"] == f"camvid:{root}"
    for split in ("train", "val", "test"):
        dataset = dm.dataset(split)
        lines = sorted(
            "\t".join(
                f"{os.path.relpath(p, dataset.root)}\t{p.stat().st_size}" for p in (image, mask)
            )
            + "\n"
            for image, mask in dataset.files
        )
        assert stored["splits"][split] == {
            "split": split,
            "samples": len(dataset),
            "content_sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
        }
    mask = dm.dataset("val").files[0][1]
    mask.write_bytes(mask.read_bytes() + b"\0")  # one more byte
    again = SegmentationFilesDataModule(f"camvid:{root}", crop_size=(32, 48)).data_fingerprint()
    (difference,) = fingerprint_differences(stored, again)
    assert difference.startswith(
        f"the val split of camvid:{root} now holds different files (names or sizes) than"
    )


def test_probe_and_pretrain_resume_refuse_changed_data(tmp_path: Path) -> None:
    from anchorlearn.engine.ssl_config import parse_pretrain_config
    from anchorlearn.engine.ssl_runner import pretrain, probe_checkpoint

    data = write_npz(tmp_path / "d.npz")
    raw = {
        "name": "tiny",
        "method": "moco",
        "data": {"source": f"npz:{data}", "batch_size": 16},
        "model": {"kwargs": {"width": 4, "feat_dim": 8}, "queue_size": 32},
        "cluster": {"num_clusters": [3]},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "trainer": {"max_epochs": 1, "progress": False},
        "eval": {"tsne": False, "probe_steps": 5},
    }
    run = tmp_path / "run"
    pretrain(parse_pretrain_config(raw), run, quiet=True, plots=False)
    last = run / "checkpoints" / "last.ckpt"
    stored = json.loads((run / "data_fingerprint.json").read_text())
    assert torch.load(last, weights_only=True)[KEY] == stored
    assert sorted(stored["splits"]) == ["test", "train"]
    probe_checkpoint(last)
    _permuted(data)
    changed = r"test and train splits .* now hold different images .* to probe anyway$"
    with pytest.raises(RunError, match=changed):
        probe_checkpoint(last)
    assert 0.0 <= probe_checkpoint(last, allow_data_change=True)["linear_probe"] <= 1.0
    longer = parse_pretrain_config({**raw, "trainer": {"max_epochs": 2, "progress": False}})
    with pytest.raises(RunError, match=r"to resume anyway$"):
        pretrain(longer, run, resume=True, quiet=True, plots=False)
