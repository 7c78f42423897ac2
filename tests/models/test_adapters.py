import importlib.util

import pytest
import torch

from anchorlearn.models import create_model


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_missing_names_the_extra() -> None:
    with pytest.raises(ImportError, match="timm"):
        create_model("timm:resnet18")


def test_a_broken_optional_import_is_an_import_error_with_the_fix(monkeypatch) -> None:
    from anchorlearn.models import adapters

    def broken(name):  # what a torchvision built for another torch raises on import
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(adapters.importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"importing 'timm' failed .*torchvision==") as info:
        adapters._import_optional("timm", "timm")
    assert "does not replace torch" in str(info.value)


def test_timm_adapter() -> None:
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", num_classes=4)
    logits, features = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4) and features.shape == (2, model.feat_dim)
    torch.testing.assert_close(model.classifier(features), logits)


def test_smp_adapter() -> None:
    pytest.importorskip("segmentation_models_pytorch")
    model = create_model("smp:unet:resnet18", num_classes=3)
    logits, features = model(torch.randn(2, 3, 64, 64))
    assert logits.shape[:2] == (2, 3) and features.shape[:2] == (2, model.feat_dim)
    torch.testing.assert_close(model.classifier(features), logits)
