import pytest
import torch

from anchorlearn.models import (
    CifarResNet,
    SmallCNN,
    SmallUNet,
    create_model,
    list_models,
    register_model,
)

CLASSIFIERS = {
    # name: (kwargs, input shape, parameter range)
    "resnet20": ({"num_classes": 10}, (2, 3, 32, 32), (0.26e6, 0.28e6)),
    "resnet32": ({"num_classes": 10}, (2, 3, 32, 32), (0.45e6, 0.48e6)),
    "small_cnn": ({"num_classes": 10}, (2, 1, 28, 28), (30e3, 80e3)),
}


def test_registry_lists_models() -> None:
    assert {"resnet20", "resnet32", "small_cnn", "seg_net"} <= set(list_models())


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnet1000")


def test_register_rejects_duplicates_and_colons() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(SmallCNN)
    with pytest.raises(ValueError, match="':'"):
        register_model("a:b")


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_contract(name: str) -> None:
    kwargs, shape, (low, high) = CLASSIFIERS[name]
    model = create_model(name, **kwargs)
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    x = torch.randn(shape)
    logits, features = model(x)
    assert logits.shape == (shape[0], 10)
    assert features.shape == (shape[0], model.feat_dim)
    assert model.num_classes == 10
    assert isinstance(model.classifier, torch.nn.Linear)
    torch.testing.assert_close(model.classifier(features), logits)
    torch.testing.assert_close(model.forward_features(x), features)
    (logits.sum() + features.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet_grey_input_feat_dim_and_option_b() -> None:
    model = CifarResNet(3, num_classes=7, in_channels=1, feat_dim=32, shortcut="B")
    logits, features = model(torch.randn(4, 1, 28, 28))
    assert logits.shape == (4, 7) and features.shape == (4, 32)
    assert sum(p.numel() for p in model.parameters()) > 0.27e6


def test_seg_net_contract() -> None:
    model = create_model("seg_net", num_classes=5)
    assert 50e3 <= sum(p.numel() for p in model.parameters()) <= 150e3
    assert isinstance(model.classifier, torch.nn.Conv2d) and model.classifier.kernel_size == (1, 1)
    x = torch.randn(2, 3, 64, 64)
    logits, features = model(x)
    assert logits.shape == (2, 5, 16, 16)
    assert features.shape == (2, model.feat_dim, 16, 16)
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        logits, features = model(x)
    torch.testing.assert_close(model.classifier(features), logits)
    assert SmallUNet.output_stride == 4


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_classes": 1}, ValueError),
        ({"num_classes": 2.0}, TypeError),
        ({"in_channels": 0}, ValueError),
        ({"feat_dim": -3}, ValueError),
        ({"shortcut": "C"}, ValueError),
    ],
)
def test_resnet_bad_arguments(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        create_model("resnet20", **kwargs)


def test_seg_net_rejects_indivisible_input() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("seg_net")(torch.randn(1, 3, 60, 60))


def test_bad_smp_name() -> None:
    with pytest.raises(ValueError, match="smp:<arch>:<encoder>"):
        create_model("smp:unet")


def test_small_cnn_pool_grid_keeps_the_layout() -> None:
    torch.manual_seed(0)
    model = SmallCNN(pool_grid=2).eval()
    assert model.feat_dim == 64 * 4
    x = torch.randn(2, 1, 28, 28)
    logits, features = model(x)
    assert logits.shape == (2, 10) and features.shape == (2, 256)
    cells = features.view(2, 64, 2, 2)
    # the cells are the averages of the 7x7 map's four (overlapping) 4x4 corners
    feature_map = model.body[:-2](x)
    assert feature_map.shape[-2:] == (7, 7)
    corners = [
        feature_map[:, :, r : r + 4, c : c + 4].mean(dim=(2, 3)) for r in (0, 3) for c in (0, 3)
    ]
    torch.testing.assert_close(cells, torch.stack(corners, dim=-1).view(2, 64, 2, 2))
    # flipping the image left-right swaps the cells' columns, which global pooling cannot see
    flipped = model.forward_features(torch.flip(x, dims=[3])).view(2, 64, 2, 2)
    assert not torch.allclose(flipped, cells)
    with pytest.raises(ValueError, match="pool_grid"):
        SmallCNN(pool_grid=0)
