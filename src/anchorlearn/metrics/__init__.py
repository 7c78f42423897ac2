"""Evaluation metrics: classification and long-tail groups, segmentation IoU, feature
geometry and self-supervised representation quality."""

from anchorlearn.metrics.classification import (
    balanced_accuracy,
    classification_report,
    group_accuracy,
    group_means,
    per_class_accuracy,
    top1_accuracy,
)
from anchorlearn.metrics.geometry import (
    center_cosines,
    center_drift,
    class_centers,
    compactness_separability,
    feature_geometry,
    nc1,
)
from anchorlearn.metrics.segmentation import SegmentationIoU, format_iou_table, mean_iou
from anchorlearn.metrics.ssl import (
    alignment,
    clustering_scores,
    coagulation,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    uniformity,
)

__all__ = [
    "SegmentationIoU",
    "alignment",
    "balanced_accuracy",
    "center_cosines",
    "center_drift",
    "class_centers",
    "classification_report",
    "clustering_scores",
    "coagulation",
    "compactness_separability",
    "feature_geometry",
    "format_iou_table",
    "group_accuracy",
    "group_means",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "mean_iou",
    "nc1",
    "per_class_accuracy",
    "top1_accuracy",
    "uniformity",
]
