"""anchorlearn.cluster: k-means (torch, or faiss), concentrations and PCL's E-step."""

from anchorlearn.cluster.concentration import estimate_concentration
from anchorlearn.cluster.estep import EStepResult, embed_shard, gather_and_cluster
from anchorlearn.cluster.kmeans import ClusterResult, kmeans

__all__ = [
    "ClusterResult",
    "EStepResult",
    "embed_shard",
    "estimate_concentration",
    "gather_and_cluster",
    "kmeans",
]
