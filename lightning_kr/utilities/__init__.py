"""What the callbacks and the recipes compute, apart from the Lightning hooks that call it.

* :mod:`~lightning_kr.utilities.mac_count`: multiply-accumulates of a model and of its static
  counterpart (``FlopsOverhead``, ``recipes/benchmark.py``).
* :mod:`~lightning_kr.utilities.embeddings`: cluster scores and t-SNE pictures of per-sample
  descriptors (``KernelEmbeddings``, ``recipes/compare.py``).
* :mod:`~lightning_kr.utilities.distributed`: per-sample rows of every DDP rank, each sample once.
* :mod:`~lightning_kr.utilities.loggers`: pictures and projector points for the loggers that show
  them.
"""

from lightning_kr.utilities.embeddings import (
    cluster_scores,
    knn_purity,
    plot_embeddings,
    standardise,
    tsne_2d,
    tsne_panel,
)
from lightning_kr.utilities.mac_count import MacCount, MacOverhead, count_macs, count_overhead

__all__ = [
    "MacCount",
    "MacOverhead",
    "cluster_scores",
    "count_macs",
    "count_overhead",
    "knn_purity",
    "plot_embeddings",
    "standardise",
    "tsne_2d",
    "tsne_panel",
]
