"""``lightning_kr.utilities.embeddings``: cluster scores and t-SNE pictures of per-sample descriptors."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_kr.utilities import cluster_scores, knn_purity, standardise
from lightning_kr.utilities.embeddings import plot_embeddings, tsne_2d, tsne_panel


def two_blobs(n: int = 40, dims: int = 6, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dims) points of two well separated classes, and their labels (n,)."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    points = rng.normal(size=(n, dims)) * 0.1 + labels[:, None] * 3.0
    return points * scale, labels


def test_standardise_keeps_constant_columns_at_zero():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    z = standardise(x)
    np.testing.assert_allclose(z[:, 0], [-1.0, 1.0])
    np.testing.assert_allclose(z[:, 1], [0.0, 0.0])


def test_scores_of_separated_and_mixed_classes():
    x, labels = two_blobs()
    assert knn_purity(x, labels, k=5) == 1.0
    scores = cluster_scores(x, labels)
    assert scores["knn_purity"] == 1.0 and scores["silhouette"] > 0.9
    # The scores ignore the scale of the variation: a tiny copy of the blobs scores the same
    # (which is why the compare recipe prints the across-sample spread beside them).
    tiny = cluster_scores(x * 1e-4 + 1.0, labels)
    assert tiny["knn_purity"] == 1.0 and tiny["silhouette"] == pytest.approx(scores["silhouette"])
    shuffled = cluster_scores(x, np.random.default_rng(1).permutation(labels))
    assert shuffled["knn_purity"] < 0.8 and shuffled["silhouette"] < 0.2


def test_exact_duplicates_are_neighbours_of_each_other_never_of_themselves():
    duplicates = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
    assert knn_purity(duplicates, np.array([0, 0, 1, 1]), k=1) == 1.0


def test_scores_need_two_classes_and_three_samples():
    x, labels = two_blobs()
    assert cluster_scores(x[:2], labels[:2]) == {}
    assert cluster_scores(x, np.zeros_like(labels)) == {}


def test_tsne_and_picture(tmp_path):
    x, labels = two_blobs(n=30)
    xy = tsne_2d(x, perplexity=5)
    assert xy.shape == (30, 2) and np.isfinite(xy).all()
    with pytest.raises(ValueError, match="at least 5 samples"):
        tsne_2d(x[:4])
    image = plot_embeddings([("a", xy), ("b", -xy)], labels, tmp_path / "t.png", "two panels")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_panel_title_names_the_space_its_size_and_scores():
    x, _ = two_blobs(n=12, dims=3)
    title, xy = tsne_panel("kernels", x, {"spread": 0.123, "knn_purity": 0.5}, perplexity=3)
    assert title == "kernels (3-d)\nspread 0.12, k-NN purity 0.50"
    assert xy.shape == (12, 2)
