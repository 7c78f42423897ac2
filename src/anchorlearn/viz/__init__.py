"""Plots: t-SNE with anchors, per-class comparisons, anchor similarity, training curves."""

from anchorlearn.viz.plots import (
    plot_anchor_similarity,
    plot_per_class,
    plot_training_curves,
    plot_tsne,
)

__all__ = ["plot_anchor_similarity", "plot_per_class", "plot_training_curves", "plot_tsne"]
