"""Per-patch dynamic convolution (second seed): HybridDense, PatchDynamicConv2d, autoencoder."""

from lightning_kr.patch.autoencoder import (
    PatchAutoencoder,
    build_autoencoder,
    count_parameters,
    dynamic_autoencoder,
    static_autoencoder,
)
from lightning_kr.patch.hybrid_dense import HybridDense, hybrid_activation, hybrid_activation_dot
from lightning_kr.patch.lit_autoencoder import LitAutoencoder
from lightning_kr.patch.patch_dynamic_conv import PatchDynamicConv2d
from lightning_kr.patch.sample_images import SampleImagesDataModule, load_sample_image

__all__ = [
    "HybridDense",
    "LitAutoencoder",
    "PatchAutoencoder",
    "PatchDynamicConv2d",
    "SampleImagesDataModule",
    "build_autoencoder",
    "count_parameters",
    "dynamic_autoencoder",
    "hybrid_activation",
    "hybrid_activation_dot",
    "load_sample_image",
    "static_autoencoder",
]
