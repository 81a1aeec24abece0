"""Per-sample descriptors (kernels, features) as points: cluster scores and t-SNE pictures.

Used by :class:`~lightning_kr.callbacks.KernelEmbeddings` (every N validation epochs) and by
``recipes/compare.py`` (the per-image kernels of each trained configuration). Descriptors are
``(N, E)`` arrays, labels ``(N,)`` integer class ids.

The scores standardise every descriptor entry to unit variance over the samples, so they rank how
well the *directions* of variation separate the classes, not how large the variation is: a nearly
static layer can score well. Read them beside the across-sample spread of
:mod:`lightning_kr.diagnostics`, which keeps the scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

SCORE_NAMES = {"silhouette": "silhouette", "knn_purity": "k-NN purity"}
"""How :func:`tsne_panel` writes a score's key; other keys are written as they are."""


def standardise(x: np.ndarray) -> np.ndarray:
    """``(N, E)`` → each column at mean 0 and standard deviation 1 (constant columns left at 0)."""
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def knn_purity(x: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Mean fraction of each sample's ``k`` nearest neighbours (itself excluded) sharing its label."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    # The first neighbour is the sample itself, except for exact duplicates: drop self wherever it is.
    others = np.array([[j for j in row if j != i][:k] for i, row in enumerate(neighbours)])
    return float((labels[others] == labels[:, None]).mean())


def cluster_scores(x: np.ndarray, labels: np.ndarray, k: int = 5) -> dict[str, float]:
    """Silhouette score and k-NN label purity of standardised ``x`` with the classes as clusters;
    ``{}`` when there are too few samples or classes to score."""
    from sklearn.metrics import silhouette_score

    classes = len(np.unique(labels))
    if len(x) < 3 or not 2 <= classes <= len(x) - 1:
        return {}
    z = standardise(x.astype(np.float64))
    return {
        "silhouette": float(silhouette_score(z, labels)),
        "knn_purity": knn_purity(z, labels, k),
    }


def tsne_2d(x: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of standardised ``x`` (N, E) → (N, 2), on one OpenMP thread.

    One thread: other ranks and dataloader workers keep running beside it, and an oversubscribed
    Barnes-Hut t-SNE slows down a hundredfold. The perplexity is capped at ``(N - 1) / 3``.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if len(x) < 5:
        raise ValueError(f"t-SNE needs at least 5 samples; got {len(x)}")
    with threadpool_limits(1):
        tsne = TSNE(2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca", random_state=seed)
        return tsne.fit_transform(standardise(x.astype(np.float64)))


def tsne_panel(
    name: str,
    x: np.ndarray,
    scores: Mapping[str, float],
    perplexity: float = 30.0,
    seed: int = 0,
) -> tuple[str, np.ndarray]:
    """A panel of :func:`plot_embeddings`: the t-SNE of ``x`` (N, E), titled ``name (E-d)`` over
    its ``scores`` (``silhouette 0.41, k-NN purity 0.87``)."""
    caption = ", ".join(f"{SCORE_NAMES.get(key, key)} {value:.2f}" for key, value in scores.items())
    return f"{name} ({x.shape[1]}-d)\n{caption}", tsne_2d(x, perplexity, seed)


def plot_embeddings(
    panels: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray,
    path: str | Path,
    title: str = "",
) -> np.ndarray:
    """Scatter plots side by side, one per ``(panel title, points (N, 2))``, coloured by class;
    saved as a PNG at ``path``. Returns the picture (H, W, 3) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(panels), 4.8), dpi=100)
    canvas = FigureCanvasAgg(fig)
    classes = np.unique(labels)
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for i, (panel_title, xy) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        scatter = ax.scatter(
            xy[:, 0], xy[:, 1], c=labels, cmap=cmap, s=8, vmin=classes.min(), vmax=classes.max()
        )
        ax.set_title(panel_title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == len(panels) - 1 and len(classes) <= 20:
            ax.legend(
                *scatter.legend_elements(num=list(classes)), title="class", fontsize=7, loc="best"
            )
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    canvas.draw()
    fig.savefig(path)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
