"""FixedETFModel: shapes, the fixed classifier, normalised (signed) features, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchorlearn.models import ETFClassifier, FixedETFModel, create_model


def test_classification_wrapper_classifies_normalised_features_with_the_etf() -> None:
    torch.manual_seed(0)
    model = FixedETFModel(create_model("small_cnn", num_classes=10), 10)
    assert isinstance(model.backbone.classifier, nn.Identity)
    assert isinstance(model.classifier, ETFClassifier)
    model.train()
    logits, features = model(torch.randn(16, 1, 28, 28))
    assert logits.shape == (16, 10) and features.shape == (16, model.feat_dim)
    torch.testing.assert_close(logits, features @ model.classifier.weight.T)
    # post-ReLU backbone features are >= 0; after the normalisation they take both signs
    raw = model.backbone.forward_features(torch.randn(16, 1, 28, 28))
    assert bool((raw >= 0).all())
    assert bool((features < 0).any()) and bool((features > 0).any())
    # the ETF never trains; the normalisation does
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "norm.weight" in trainable and not any(n.startswith("classifier") for n in trainable)


def test_dense_wrapper_keeps_the_feature_map() -> None:
    model = FixedETFModel(create_model("seg_net", num_classes=5), 5, dense=True)
    logits, features = model(torch.randn(2, 3, 32, 32))
    assert features.ndim == 4 and features.shape[1] == model.feat_dim
    assert logits.shape == (2, 5, *features.shape[-2:])


def test_model_without_feat_dim_or_classifier_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="feat_dim"):
        FixedETFModel(nn.Linear(4, 2), 2)
    bare = nn.Module()
    bare.feat_dim = 8
    with pytest.raises(TypeError, match="classifier"):
        FixedETFModel(bare, 2)


def test_a_training_batch_of_one_uses_the_running_statistics() -> None:
    # the last batch of an epoch may hold a single image; plain BatchNorm1d raises there
    model = FixedETFModel(create_model("small_cnn", num_classes=10), 10).train()
    model(torch.randn(8, 1, 28, 28))
    running = model.norm.running_mean.clone()
    logits, features = model(torch.randn(1, 1, 28, 28))
    assert logits.shape == (1, 10) and bool(torch.isfinite(features).all())
    torch.testing.assert_close(model.norm.running_mean, running)
    row = torch.randn(1, model.feat_dim)
    norm = model.norm
    expected = (row - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(norm(row), expected * norm.weight + norm.bias)
