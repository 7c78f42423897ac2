"""Backbones and segmentation networks that return ``(logits, features)``.

Every model exposes ``classifier`` (its final ``nn.Linear`` or 1x1 ``nn.Conv2d``),
``feat_dim``, ``num_classes`` and ``forward_features(x)``. Build one by name with
:func:`create_model`; :func:`list_models` lists the registered names.
"""

from anchorlearn.models.cnn import SmallCNN, small_cnn
from anchorlearn.models.etf import FixedETFModel
from anchorlearn.models.moco import MoCo
from anchorlearn.models.registry import create_model, list_models, register_model
from anchorlearn.models.resnet_cifar import CifarResNet, resnet20, resnet32
from anchorlearn.models.segmentation import SmallUNet, seg_net

__all__ = [
    "CifarResNet",
    "FixedETFModel",
    "MoCo",
    "SmallCNN",
    "SmallUNet",
    "create_model",
    "list_models",
    "register_model",
    "resnet20",
    "resnet32",
    "seg_net",
    "small_cnn",
]
