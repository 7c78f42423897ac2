"""Config mistakes caught when a config is read: duplicate keys, numbers YAML reads as text,
loss parameter typos, and the supervised ``eval`` section and ``data.max_test_samples``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from anchorlearn.engine.config import (
    ConfigError,
    EvalConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    parse_config,
    read_config_file,
)
from anchorlearn.engine.ssl_config import load_pretrain_config, parse_pretrain_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- duplicate keys


def test_a_key_given_twice_names_the_file_the_key_path_and_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.yaml",
        "name: run\n"  # 1
        "data:\n"  # 2
        "  source: digits\n"  # 3
        "optim:\n"  # 4
        "  name: sgd\n"  # 5
        "  momentum: 0.9\n"  # 6
        "  lr: 0.05\n"  # 7
        "  weight_decay: 0.0\n"  # 8
        "  lr: 5.0\n",  # 9
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: optim.lr is given twice (lines 7 and 9)"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: a\nseed: 1\nname: b\n", r"name is given twice \(lines 1 and 3\)"),
        # inside a list item (a loss), at depth three
        (
            "losses:\n- ce\n- name: sar\n  pull_weight: 0.1\n  pull_weight: 0.2\n",
            r"losses\.1\.pull_weight is given twice \(lines 4 and 5\)",
        ),
        (
            "model:\n  kwargs:\n    width: 8\n    width: 16\n",
            r"model\.kwargs\.width is given twice \(lines 3 and 4\)",
        ),
        # flow style on one line
        ("optim: {lr: 0.1, lr: 0.2}\n", r"optim\.lr is given twice \(lines 1 and 1\)"),
    ],
)
def test_duplicates_at_any_depth_are_refused(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path / "dup.yaml", text)
    with pytest.raises(ConfigError, match=rf"^.*dup\.yaml: {where}$"):
        read_config_file(path)


def test_pretraining_configs_refuse_duplicates_too(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ssl.yaml", "method: moco\nloss:\n  num_negatives: 8\n  num_negatives: 9\n"
    )
    with pytest.raises(ConfigError, match=r"ssl\.yaml: loss\.num_negatives is given twice"):
        load_pretrain_config(path)


def test_merge_keys_may_be_overridden_and_are_not_duplicates(tmp_path: Path) -> None:
    path = write(
        tmp_path / "merge.yaml",
        "base: &base {lr: 0.1, momentum: 0.8}\noptim:\n  <<: *base\n  lr: 0.2\n",
    )
    raw = read_config_file(path)
    assert raw["optim"] == {"lr": 0.2, "momentum": 0.8}


def test_a_set_value_with_a_key_given_twice_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"^--set optim=\{lr: 1, lr: 2\}: optim\.lr is given twice"
    ):
        apply_overrides({}, ["optim={lr: 1, lr: 2}"])


def test_every_shipped_config_still_loads() -> None:
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert files
    for path in files:
        if "ssl" in path.parts:
            load_pretrain_config(path)
        else:
            load_config(path)


# ---------------------------------------------------------------- numbers that YAML reads as text


def test_an_exponent_without_a_dot_is_a_string_and_the_error_says_how_to_write_it() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"optim": {"lr": "5e-2"}})
    assert str(info.value) == (
        "optim.lr must be a number, got the string '5e-2' "
        "(YAML reads 5e-2 as text; write 0.05 or 5.0e-2)"
    )


def test_the_suggested_spellings_read_back_as_the_same_number(tmp_path: Path) -> None:
    cases = (("5e-2", 0.05, 2), ("1E3", 1000.0, 2), ("1e-8", 1e-8, 1), ("-25E+0", -25.0, 2))
    for text, value, count in cases:
        path = write(tmp_path / "lr.yaml", f"optim:\n  min_lr: {text}\n")
        assert read_config_file(path)["optim"]["min_lr"] == text  # YAML 1.1: text
        with pytest.raises(
            ConfigError, match=rf"got the string '{re.escape(text)}' .*; write .*\)$"
        ) as info:
            load_config(path)
        message = str(info.value)
        spellings = message[message.index("; write ") + 8 : -1].split(" or ")
        assert len(spellings) == count
        for spelling in spellings:
            assert yaml.safe_load(spelling) == pytest.approx(value)


def test_a_quoted_number_gets_a_hint_and_other_strings_do_not() -> None:
    with pytest.raises(ConfigError, match=r"got the string '0\.5' \(.*write 0\.5 without quotes\)"):
        parse_config({"data": {"val_fraction": "0.5"}})
    with pytest.raises(ConfigError, match=r"^optim\.lr must be a number, got 'fast'$"):
        parse_config({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"^data\.batch_size must be an integer, got '1e3' "):
        parse_config({"data": {"batch_size": "1e3"}})


def test_a_string_number_in_a_list_of_numbers_gets_the_hint_too() -> None:
    with pytest.raises(ConfigError, match=r"data\.ratio_range\.1 must be a number, got the string"):
        parse_config({"data": {"ratio_range": [0.5, "2e0"]}})


# ---------------------------------------------------------------- loss parameters


def test_a_loss_parameter_typo_is_caught_when_the_config_is_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path / "typo.yaml",
        "losses:\n- ce\n- name: sar\n  pull_wieght: 0.1\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(
        "losses.1: unknown parameter 'pull_wieght' for loss sar (did you mean 'pull_weight'?); "
        "allowed: "
    )
    assert "\n" not in message and "update_conf" in message


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (["ce", {"name": "sar", "params": {"pull_wieght": 0.1}}], r"did you mean 'pull_weight'"),
        (["ce", {"name": "center", "wieght": 0.1}], r"losses\.1: unknown parameter 'wieght'"),
        (["cross_entropy"], r"losses\.0: unknown loss 'cross_entropy'; known losses: "),
        (["ce", "sarr"], r"unknown loss 'sarr' \(did you mean 'sar'\?\)"),
        (["ce", {"name": "sar", "projector": "mlp"}], r"unknown parameter 'projector'"),
        (["ce", {"name": "sar", "ignore_index": 3}], r"unknown parameter 'ignore_index'"),
        # injected by the engine from the data and the model, not set in a config
        (["ce", {"name": "sar", "num_classes": 3}], r"unknown parameter 'num_classes'"),
    ],
)
def test_loss_names_and_parameters_are_checked_by_parse_config(losses, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"losses": losses})


def test_known_loss_parameters_still_parse() -> None:
    cfg = parse_config({"losses": ["ce", {"name": "sar", "pull_weight": 0.2, "update_conf": 0.5}]})
    assert cfg.losses[1].params == {"pull_weight": 0.2, "update_conf": 0.5}


def test_compare_refuses_a_typo_before_training_any_config(tmp_path: Path, monkeypatch) -> None:
    from anchorlearn.engine import compare

    trained = []

    def fake_fit(cfg, run_dir, **kwargs):
        trained.append(cfg.name)
        raise AssertionError(f"{cfg.name} was trained")

    monkeypatch.setattr(compare, "fit", fake_fit)
    good = write(tmp_path / "good.yaml", "name: good\nlosses: [ce]\n")
    typo = write(
        tmp_path / "typo.yaml", "name: typo\nlosses:\n- ce\n- name: sar\n  pull_wieght: 1\n"
    )
    with pytest.raises(ConfigError, match=r"pull_wieght"):
        compare.run_grid([good, typo], [0], tmp_path / "grid")
    assert trained == []


# ---------------------------------------------------------------- eval section, max_test_samples


def test_the_eval_section_defaults_and_round_trips() -> None:
    cfg = parse_config({"name": "run"})
    assert cfg.eval == EvalConfig(plots=True, tsne_points=1500)
    stored = config_to_dict(parse_config({"eval": {"plots": False, "tsne_points": 40}}))
    again = parse_config(stored)
    assert again.eval == EvalConfig(plots=False, tsne_points=40)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"plots": "no"}, r"^eval\.plots must be true or false, got 'no'$"),
        ({"tsne_points": 1}, r"^eval\.tsne_points must be >= 3, got 1$"),
        # a t-SNE needs 3 points: 2 test points passed here, then failed after training
        ({"tsne_points": 2}, r"^eval\.tsne_points must be >= 3, got 2$"),
        ({"tsne_points": 2.5}, r"^eval\.tsne_points must be an integer, got 2\.5$"),
        ({"tsne": False}, r"^unknown key 'eval\.tsne'.*allowed keys in eval: plots, tsne_points"),
    ],
)
def test_the_eval_section_is_validated(section, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"eval": section})


def test_eval_tsne_points_starts_at_what_a_tsne_needs() -> None:
    from anchorlearn.viz.plots import TSNE_MIN_POINTS

    cfg = parse_config({"eval": {"tsne_points": TSNE_MIN_POINTS}})
    assert cfg.eval.tsne_points == TSNE_MIN_POINTS
    with pytest.raises(ConfigError, match=rf"must be >= {TSNE_MIN_POINTS}, got"):
        parse_config({"eval": {"tsne_points": TSNE_MIN_POINTS - 1}})


def test_pretraining_keeps_its_own_eval_section() -> None:
    cfg = parse_pretrain_config({"method": "moco", "eval": {"tsne": False, "knn_k": 5}})
    assert cfg.eval.tsne is False and cfg.eval.knn_k == 5
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.plots'"):
        parse_pretrain_config({"method": "moco", "eval": {"plots": False}})


def test_max_test_samples_is_validated() -> None:
    assert parse_config({}).data.max_test_samples is None
    assert parse_config({"data": {"max_test_samples": 7}}).data.max_test_samples == 7
    with pytest.raises(ConfigError, match=r"^data\.max_test_samples must be >= 2, got 0$"):
        parse_config({"data": {"max_test_samples": 0}})
    # one test image is one class, and the evaluation compares classes: refused as the
    # config is read, not after training
    with pytest.raises(ConfigError, match=r"^data\.max_test_samples must be >= 2, got 1$"):
        parse_config({"data": {"max_test_samples": 1}})
    with pytest.raises(ConfigError, match=r"data\.max_test_samples=5 is for classification"):
        parse_config({"task": "segmentation", "data": {"source": "scenes", "max_test_samples": 5}})


def _npz_source(tmp_path: Path) -> str:
    """An npz of 3 unequal classes (40, 25, 10 images); each image holds its own index."""
    import numpy as np

    labels = np.repeat(np.arange(3), [40, 25, 10])
    images = np.zeros((len(labels), 4, 4), np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256
    path = tmp_path / "three.npz"
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


def _test_split(source: str, n: int | None, seed: int) -> tuple[list[int], list[int]]:
    from anchorlearn.engine.datamodules import ClassificationDataModule

    dm = ClassificationDataModule(source, batch_size=4, max_test_samples=n, seed=seed)
    images, labels = dm.dataset("test").tensors
    return images[:, 0, 0, 0].tolist(), labels.tolist()


@pytest.mark.parametrize("n", [3, 8, 14])
def test_max_test_samples_keeps_exactly_n_stratified_images(tmp_path: Path, n: int) -> None:
    source = _npz_source(tmp_path)
    full_ids, full_labels = _test_split(source, None, seed=0)
    assert len(full_ids) == 15  # 20 % of each class: 8 + 5 + 2
    ids, labels = _test_split(source, n, seed=0)
    assert len(ids) == n == len(set(ids))
    assert set(ids) <= set(full_ids)  # a subset of the test split, never training images
    full_label = dict(zip(full_ids, full_labels, strict=True))
    assert [full_label[i] for i in ids] == labels
    counts = [labels.count(c) for c in range(3)]
    assert min(counts) >= 1  # every class keeps at least one image, the rest in proportion
    if n == 8:  # 1 each, then 5 in proportion to (7, 4, 1): 2.92, 1.67, 0.42 -> 3, 2, 0
        assert counts == [4, 3, 1]
    assert _test_split(source, n, seed=0)[0] == ids  # the same subset for the same seed


def test_max_test_samples_draws_another_subset_for_another_seed(tmp_path: Path) -> None:
    source = _npz_source(tmp_path)
    subsets = {tuple(_test_split(source, 7, seed=s)[0]) for s in range(4)}
    assert len(subsets) > 1
    assert _test_split(source, 100, seed=0) == _test_split(source, None, seed=0)


@pytest.mark.parametrize("n", [1, 2])
def test_max_test_samples_below_the_test_classes_is_refused_as_the_data_load(
    tmp_path: Path, n: int
) -> None:
    # the evaluation after training scored fewer classes than the test split has (one:
    # "labels must contain at least 2 classes"), or drew a t-SNE of too few points
    from anchorlearn.engine.datamodules import ClassificationDataModule

    dm = ClassificationDataModule(_npz_source(tmp_path), max_test_samples=n)
    message = (
        rf"^data\.max_test_samples={n} is below the 3 classes of the test split of npz:.*: "
        r"every class needs a test image; set it to at least 3 or remove it$"
    )
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


def test_max_test_samples_counts_the_classes_the_test_split_holds(tmp_path: Path) -> None:
    # 2 images of class 2 are too few for the 20 % test split: it holds classes 0 and 1 only
    import numpy as np

    from anchorlearn.engine.datamodules import ClassificationDataModule

    labels = np.repeat(np.arange(3), [20, 20, 2])
    path = tmp_path / "few.npz"
    np.savez(path, images=np.zeros((len(labels), 4, 4), np.uint8), labels=labels)
    dm = ClassificationDataModule(f"npz:{path}", max_test_samples=2)
    assert sorted(dm.dataset("test").tensors[1].tolist()) == [0, 1]
    with pytest.raises(ValueError, match=r"max_test_samples=1 is below the 2 classes"):
        ClassificationDataModule(f"npz:{path}", max_test_samples=1).setup()
