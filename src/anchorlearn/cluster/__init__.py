"""anchorlearn.cluster: k-means (torch, or faiss) and concentrations."""

from anchorlearn.cluster.concentration import estimate_concentration
from anchorlearn.cluster.kmeans import ClusterResult, kmeans

__all__ = ["ClusterResult", "estimate_concentration", "kmeans"]
