"""Backbones and segmentation networks that return ``(logits, features)``.

Every model exposes ``classifier`` (its final ``nn.Linear`` or 1x1 ``nn.Conv2d``),
``feat_dim``, ``num_classes`` and ``forward_features(x)``. Build one by name with
:func:`create_model`; :func:`list_models` lists the registered names.
"""

from anchorlearn.models.cnn import SmallCNN, small_cnn
from anchorlearn.models.etf import ETFClassifier, FixedETFModel, simplex_etf
from anchorlearn.models.heads import DecodeHead, DeepLabV3PlusHead, FCNHead, MLPHead
from anchorlearn.models.moco import MoCo
from anchorlearn.models.registry import create_model, list_models, register_model
from anchorlearn.models.resnet_cifar import CifarResNet, CosineClassifier, resnet20, resnet32
from anchorlearn.models.segmentation import SmallUNet, seg_net
from anchorlearn.models.segmentor import EncoderDecoder, deeplabv3plus, fcn, mlp_head

__all__ = [
    "CifarResNet",
    "CosineClassifier",
    "DecodeHead",
    "DeepLabV3PlusHead",
    "ETFClassifier",
    "EncoderDecoder",
    "FCNHead",
    "FixedETFModel",
    "MLPHead",
    "MoCo",
    "SmallCNN",
    "SmallUNet",
    "create_model",
    "deeplabv3plus",
    "fcn",
    "list_models",
    "mlp_head",
    "register_model",
    "resnet20",
    "resnet32",
    "seg_net",
    "simplex_etf",
    "small_cnn",
]
