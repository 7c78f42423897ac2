from pathlib import Path

import numpy as np
import pytest

from anchorlearn.cli import build_parser, main
from anchorlearn.data.preview import preview


def test_preview_digits(tmp_path, capsys):
    out = tmp_path / "d.png"
    counts = preview("digits", out, n=10, seed=1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(counts.values()) == 1797 and len(counts) == 10
    assert "digits: images per class" in capsys.readouterr().out


def test_preview_npz_and_bad_spec(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 5, 5, 3), np.uint8), labels=np.array([0, 1, 1, 1]))
    assert preview(f"npz:{path}", tmp_path / "n.png", n=3) == {"0": 1, "1": 3}
    with pytest.raises(ValueError, match=r"spec must be one of .*'voc:ROOT', got 'cifar'"):
        preview("cifar", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"needs a number IR >= 1, got 'fashion_mnist_lt:x'"):
        preview("fashion_mnist_lt:x", tmp_path / "x.png")


def test_cli_preview(tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["data", "preview", "digits", "--out", str(out), "--n", "4"]) == 0
    assert out.is_file()
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_preview_says_which_file_it_wrote(tmp_path, capsys):
    assert main(["data", "preview", "digits", "--out", str(tmp_path / "grid"), "--n", "4"]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert f"wrote {tmp_path / 'grid.png'}" in capsys.readouterr().out
    assert main(["data", "preview", "digits", "--out", str(tmp_path)]) == 2
    assert "is a directory: give a file name" in capsys.readouterr().err


def test_cli_user_error_is_one_line(tmp_path, capsys):
    code = main(["data", "preview", f"npz:{tmp_path / 'nope.npz'}", "--out", "x.png"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("anchorlearn: error: npz file not found")
    assert "Traceback" not in err


def test_parser_structure():
    args = build_parser().parse_args(["data", "preview", "scenes", "--out", "p.png"])
    assert (args.command, args.data_command, args.spec, args.n, args.seed) == (
        "data",
        "preview",
        "scenes",
        32,
        0,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_preview_segmentation_set_reads_only_the_sample(tmp_path, capsys, monkeypatch):
    from tests.data.segfixtures import make_camvid

    from anchorlearn.data import segmentation_sets
    from anchorlearn.data.preview import _SEGMENTATION_KINDS

    assert segmentation_sets.SEGMENTATION_KINDS == _SEGMENTATION_KINDS
    root = make_camvid(tmp_path / "data")
    read = []
    original = segmentation_sets.SegmentationDataset.__getitem__

    def spy(self, index):
        read.append(index)
        return original(self, index)

    monkeypatch.setattr(segmentation_sets.SegmentationDataset, "__getitem__", spy)
    out = tmp_path / "camvid.png"
    counts = preview(f"camvid:{root}", out, n=3, seed=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read) == 3 and len(set(read)) == 3
    # counts are the sampled masks' pixels per class, ignore excluded
    ds = segmentation_sets.open_segmentation(f"camvid:{root}", "train")
    masks = np.concatenate([original(ds, i)[1].ravel() for i in sorted(read)])
    expected = np.bincount(masks[masks != 255], minlength=11)
    assert list(counts) == ds.class_names
    assert list(counts.values()) == expected.tolist()
    assert "pixels per class in 3 of 4 training images" in capsys.readouterr().out


def test_cli_preview_segmentation_set(tmp_path, capsys):
    from tests.data.segfixtures import make_ade20k

    root = make_ade20k(tmp_path)
    out = tmp_path / "ade.png"
    assert main(["data", "preview", f"ade20k:{root.parent}", "--out", str(out), "--n", "9"]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert "pixels per class in 4 of 4 training images" in printed and "  wall " in printed
    assert main(["data", "preview", f"ade20k:{tmp_path / 'none'}", "--out", str(out)]) == 2
    assert "ade20k data folder not found" in capsys.readouterr().err


def test_cli_preview_of_cifar10_draws_colour_images(tmp_path, capsys):
    from PIL import Image
    from tests.data.cifarfixtures import make_cifar_batches

    root = make_cifar_batches(tmp_path / "cifar", per_class=1)
    out = tmp_path / "cifar.png"
    assert main(["data", "preview", f"cifar10:{root}", "--out", str(out), "--n", "6"]) == 0
    printed = capsys.readouterr().out
    assert "airplane" in printed and "truck" in printed
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # the fixture's images are red-tinted by class: the grid is not grey
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 50


def test_a_config_given_as_the_spec_names_the_spec_of_its_data_source(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    with pytest.raises(ValueError, match=r"preview fashion_mnist_lt:100 --out PNG"):
        preview(str(root / "fmnist_lt" / "ce_sar.yaml"), tmp_path / "x.png")
    # a standard segmentation set: its root is named as the config gives it (nothing is read)
    segmentation = tmp_path / "seg.yaml"
    segmentation.write_text("data:\n  source: camvid:/data/CamVid\n  batch_size: 8\n")
    with pytest.raises(ValueError, match=r"preview camvid:/data/CamVid --out PNG$"):
        preview(str(segmentation), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"preview scenes --out PNG \(the scenes with"):
        preview(str(root / "scenes" / "ce_sar.yaml"), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"missing.yml is a config file.*such as"):
        preview(str(tmp_path / "missing.yml"), tmp_path / "x.png")
    (tmp_path / "broken.yaml").write_text("data: [unclosed")
    with pytest.raises(ValueError, match=r"broken.yaml is a config file.*such as"):
        preview(str(tmp_path / "broken.yaml"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
