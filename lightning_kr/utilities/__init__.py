"""Helpers shared by the callbacks and the recipes: no Lightning in here."""

from lightning_kr.utilities.embeddings import (
    cluster_scores,
    knn_purity,
    plot_embeddings,
    standardise,
    tsne_2d,
)

__all__ = ["cluster_scores", "knn_purity", "plot_embeddings", "standardise", "tsne_2d"]
