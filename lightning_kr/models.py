"""Architectures of the poster's rows, and any torchvision classifier by name.

``build_model("resnet18", num_classes=1000)`` returns an ordinary (static) ``nn.Module``; convert it
with :func:`~lightning_kr.kr_convert` (or let :class:`~lightning_kr.KRClassifier` do it). Two rows
of the poster have no torchvision builder of their own, so they are defined here:

* :func:`vit_tiny` — ViT-Tiny / DeiT-Tiny: patch 16, width 192, depth 12, 3 heads, MLP 768.
* :func:`mobilenet_v2_050` — MobileNetV2 with width multiplier 0.5.

Every other name goes to :func:`torchvision.models.get_model` with ``weights=None``: nothing is ever
downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn
from torchvision.models import MobileNetV2, VisionTransformer


def vit_tiny(num_classes: int = 1000, image_size: int = 224, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny (DeiT-Tiny, 5.7 M parameters at 1000 classes): images (B, 3, S, S) → logits (B, K).

    Args:
        num_classes: ``K``.
        image_size: ``S``, a multiple of the patch size 16.
        kwargs: other :class:`~torchvision.models.VisionTransformer` arguments (``dropout``,
            ``attention_dropout``...).
    """
    options = {
        "patch_size": 16,
        "num_layers": 12,
        "num_heads": 3,
        "hidden_dim": 192,
        "mlp_dim": 768,
    }
    options.update(kwargs)
    return VisionTransformer(image_size=image_size, num_classes=num_classes, **options)


def mobilenet_v2_050(num_classes: int = 1000, **kwargs: Any) -> MobileNetV2:
    """MobileNetV2 (0.5×), 1.97 M parameters at 1000 classes: images (B, 3, H, W) → logits (B, K).

    Args:
        num_classes: ``K``.
        kwargs: other :class:`~torchvision.models.MobileNetV2` arguments (``dropout`` before the
            classifier, 0.2 by default as in ODConv's recipe).
    """
    return MobileNetV2(num_classes=num_classes, width_mult=0.5, **kwargs)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny": vit_tiny,
    "mobilenet_v2_050": mobilenet_v2_050,
}

# Builders whose architecture depends on the image size (a ViT's position embeddings).
SIZED_BUILDERS = frozenset({"vit_tiny"})


def build_model(
    name: str, num_classes: int = 1000, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """A freshly initialised classifier (no pretrained weights) by builder name.

    Args:
        name: ``"vit_tiny"``, ``"mobilenet_v2_050"`` or any name of
            :func:`torchvision.models.list_models` (``"resnet18"``, ``"convnext_tiny"``...).
        num_classes: number of logits ``K``.
        image_size: side of the input images; passed to the builders whose architecture depends on
            it (ViTs) and ignored by the others.
        kwargs: further builder arguments (``dropout``, ``width_mult``...).

    Returns:
        A model mapping images (B, 3, H, W) to logits (B, K).

    Raises:
        ValueError: if no builder has this name.
    """
    if image_size is not None and (name in SIZED_BUILDERS or name.startswith("vit_")):
        kwargs.setdefault("image_size", image_size)
    if name in BUILDERS:
        return BUILDERS[name](num_classes=num_classes, **kwargs)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"no classifier builder is called {name!r}; choose one of {sorted(BUILDERS)} or a "
            f"torchvision classifier such as {', '.join(sorted(available)[:8])}, ... "
            "(torchvision.models.list_models(module=torchvision.models)), or pass an nn.Module"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
