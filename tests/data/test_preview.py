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
    with pytest.raises(ValueError, match=r"spec must be one of .* got 'cifar'"):
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
