import importlib.util
from collections import OrderedDict

import pytest
import torch
from torch import nn

from anchorlearn.models.pretrained import (
    adapt_input_conv,
    fit_state_dict,
    load_into,
    load_pretrained,
    load_state_dict_file,
)


class Tiny(nn.Module):
    """A stem convolution, a batch norm and a classifier head."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


def _random_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Random values for every entry of ``module``'s state dict (positive running variances)."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in module.state_dict().items()}
    return {k: v.abs() + 0.1 if k.endswith("running_var") else v for k, v in state.items()}


def _assert_loaded(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


# ---- load_state_dict_file ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_file_round_trip(tmp_path, suffix) -> None:
    state = _random_state(Tiny())
    path = tmp_path / f"w{suffix}"
    torch.save(state, path)
    loaded = load_state_dict_file(path)
    assert list(loaded) == list(state)
    for key in state:
        assert torch.equal(loaded[key], state[key])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s, "epoch": 3, "global_step": 10},  # Lightning
        lambda s: {"model": s, "optimizer": {"lr": 0.1}},  # timm/DeiT training scripts
        lambda s: {"meta": {"iter": 1}, "state_dict": s},  # mmsegmentation
        lambda s: {"model": {"state_dict": s}, "epoch": 1},  # nested twice
    ],
)
def test_file_unwraps_checkpoints(tmp_path, wrap) -> None:
    state = _random_state(Tiny())
    torch.save(wrap(state), tmp_path / "c.ckpt")
    loaded = load_state_dict_file(tmp_path / "c.ckpt")
    assert list(loaded) == list(state)


def test_missing_file_is_one_line_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"path must be an existing weights file.*nope"):
        load_state_dict_file(tmp_path / "nope.pth")


def test_pickled_module_is_refused_safely(tmp_path) -> None:
    torch.save(Tiny(), tmp_path / "module.pth")  # loading it would need to run code
    with pytest.raises(ValueError, match=r"weights_only=True") as info:
        load_state_dict_file(tmp_path / "module.pth")
    assert "\n" not in str(info.value)


def test_corrupt_and_non_tensor_files(tmp_path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_state_dict_file(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"2 non-tensor entries \(epoch, lr\)"):
        load_state_dict_file(tmp_path / "meta.pth")
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"non-empty state dict .*, got an empty mapping"):
        load_state_dict_file(tmp_path / "empty.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="got list"):
        load_state_dict_file(tmp_path / "list.pth")
    with pytest.raises(TypeError, match="path must be a str"):
        load_state_dict_file(3)


def test_safetensors_file(tmp_path) -> None:
    if importlib.util.find_spec("safetensors") is None:
        with pytest.raises(ImportError, match="safetensors"):
            (tmp_path / "w.safetensors").write_bytes(b"")
            load_state_dict_file(tmp_path / "w.safetensors")
        return
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _random_state(Tiny()).items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


# ---- load_into -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "encoder.", "module.backbone."])
def test_prefixes_are_removed(prefix) -> None:
    state = _random_state(Tiny())
    source = {prefix + k: v for k, v in state.items()}
    source["head.conv.weight"] = torch.zeros(3)  # outside the prefix (when there is one)
    module = Tiny()
    if not prefix:
        with pytest.raises(ValueError, match=r"1 unexpected key\(s\) \(head.conv.weight\)"):
            load_into(module, source)
        return
    report = load_into(module, source)
    _assert_loaded(module, state)
    assert report.prefix == prefix
    assert report.ignored == ("head.conv.weight",)
    assert set(report.loaded) == set(state)


def test_custom_prefix_candidates() -> None:
    state = _random_state(Tiny())
    module = Tiny()
    load_into(module, {"net." + k: v for k, v in state.items()}, prefix_candidates=("", "net."))
    _assert_loaded(module, state)


@pytest.mark.parametrize("pattern", ["fc", "fc.", "fc.*"])
def test_ignore_drops_file_keys_and_module_requirements(pattern) -> None:
    state = _random_state(Tiny())
    without_fc = {k: v for k, v in state.items() if not k.startswith("fc.")}
    module = Tiny()
    before = module.fc.weight.detach().clone()
    report = load_into(module, {**without_fc, "fc.weight": torch.zeros(7)}, ignore=(pattern,))
    assert report.ignored == ("fc.weight",)
    assert torch.equal(module.fc.weight, before)  # not loaded, not required
    torch.testing.assert_close(module.conv1.weight, state["conv1.weight"], rtol=0, atol=0)


def test_missing_unexpected_and_shape_errors_name_the_keys() -> None:
    state = _random_state(Tiny())
    incomplete = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with pytest.raises(
        ValueError, match=r"does not fit Tiny: 2 missing key\(s\) \(fc.weight, fc.bias\)"
    ):
        load_into(Tiny(), incomplete)
    extra = {**state, "layer9.weight": torch.zeros(1), "a": torch.zeros(1)}
    extra.update({f"x{i}": torch.zeros(1) for i in range(3)})
    with pytest.raises(ValueError, match=r"5 unexpected key\(s\) \(layer9.weight, a, x0, \.\.\.\)"):
        load_into(Tiny(), extra)
    wrong = {**state, "fc.weight": torch.zeros(3, 4)}
    with pytest.raises(
        ValueError, match=r"shape mismatch.*fc.weight: file \(3, 4\), module \(2, 4\)"
    ):
        load_into(Tiny(), wrong)
    with pytest.raises(ValueError, match=r"shares no key with Tiny.*conv1.weight"):
        load_into(Tiny(), {"other.weight": torch.zeros(1)})


def test_error_names_the_removed_prefix() -> None:
    state = {"backbone." + k: v for k, v in _random_state(Tiny()).items() if k != "bn1.bias"}
    with pytest.raises(ValueError, match=r"after removing the prefix 'backbone.'.*bn1.bias"):
        load_into(Tiny(), state)


def test_non_strict_reports_instead_of_failing() -> None:
    state = _random_state(Tiny())
    partial = {k: v for k, v in state.items() if not k.startswith("fc.")}
    partial["extra.weight"] = torch.zeros(1)
    module = Tiny()
    report = load_into(module, partial, strict=False)
    assert report.missing == ("fc.weight", "fc.bias")
    assert report.unexpected == ("extra.weight",)
    torch.testing.assert_close(module.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape mismatch"):  # never loadable
        load_into(Tiny(), {**state, "fc.bias": torch.zeros(5)}, strict=False)


def test_old_files_without_num_batches_tracked_load() -> None:
    state = _random_state(Tiny())
    old = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    module = Tiny()
    load_into(module, old)
    torch.testing.assert_close(module.bn1.running_var, state["bn1.running_var"], rtol=0, atol=0)


def test_fit_state_dict_does_not_touch_the_module() -> None:
    state = _random_state(Tiny())
    module = Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fitted, report = fit_state_dict(module, {"module." + k: v for k, v in state.items()})
    assert set(fitted) == set(state) and report.prefix == "module."
    assert all(fitted[k] is state[k] for k in state)
    _assert_loaded(module, before)


def test_argument_types() -> None:
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
        load_into("model", {})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_into(Tiny(), [("a", torch.zeros(1))])
    with pytest.raises(TypeError, match="values must be tensors, got non-tensors at epoch"):
        load_into(Tiny(), {**_random_state(Tiny()), "epoch": 3})
    with pytest.raises(TypeError, match="sequences of str, got a str"):
        load_into(Tiny(), _random_state(Tiny()), ignore="fc")


# ---- input channels ------------------------------------------------------------------------


def test_adapt_input_conv_values() -> None:
    weight = torch.randn(5, 3, 3, 3)
    torch.testing.assert_close(adapt_input_conv(weight, 1), weight.sum(1, keepdim=True))
    two = adapt_input_conv(weight, 2)
    assert two.shape == (5, 2, 3, 3)
    torch.testing.assert_close(two[:, 0], weight.sum(1) / 2)
    torch.testing.assert_close(two[:, 1], weight.sum(1) / 2)
    with pytest.raises(ValueError, match="4-D convolution weight"):
        adapt_input_conv(torch.zeros(5, 3), 1)


@pytest.mark.parametrize("in_channels", [1, 2, 4])
def test_adapted_stem_sees_equal_channels_as_rgb_sees_grey(in_channels) -> None:
    rgb = Tiny().eval()
    load_into(rgb, _random_state(rgb))
    other = Tiny(in_channels).eval()
    report = load_into(other, rgb.state_dict(), input_conv="conv1.weight")
    assert report.adapted == "conv1.weight"
    grey = torch.randn(2, 1, 6, 6)
    expected = rgb(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(other(grey.expand(-1, in_channels, -1, -1)), expected)


def test_grey_without_input_conv_says_how_to_adapt() -> None:
    with pytest.raises(ValueError, match=r"conv1.weight: file \(4, 3, 3, 3\).*input_conv='conv1"):
        load_into(Tiny(1), _random_state(Tiny()))


# ---- load_pretrained -----------------------------------------------------------------------


def test_load_pretrained_dispatch(tmp_path) -> None:
    assert load_pretrained(Tiny(), None, name="tiny") is None
    with pytest.raises(ValueError, match="'imagenet' is not available for tiny"):
        load_pretrained(Tiny(), "imagenet", name="tiny")
    with pytest.raises(TypeError, match="pretrained must be None, 'imagenet' or the path"):
        load_pretrained(Tiny(), True, name="tiny")
    state = _random_state(Tiny())
    module = Tiny()
    load_pretrained(module, "imagenet", name="tiny", imagenet=lambda: state)
    _assert_loaded(module, state)
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()}}, tmp_path / "w.pth")
    module = Tiny()
    report = load_pretrained(module, tmp_path / "w.pth", name="tiny", ignore=("fc",))
    assert report.prefix == "model." and set(report.ignored) == {"model.fc.weight", "model.fc.bias"}
