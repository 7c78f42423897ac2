"""anchorlearn.cluster: k-means (faiss when installed, torch otherwise) and concentrations."""

from anchorlearn.cluster.concentration import estimate_concentration
from anchorlearn.cluster.kmeans import ClusterResult, kmeans

__all__ = ["ClusterResult", "estimate_concentration", "kmeans"]
