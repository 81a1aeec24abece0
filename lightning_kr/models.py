"""Architectures of the poster's rows, and any torchvision classifier by name.

``build_model("resnet18", num_classes=1000)`` returns an ordinary (static) ``nn.Module`` that
remembers how it was built; convert it with :func:`~lightning_kr.kr_convert` (or let
:class:`~lightning_kr.KRClassifier` do it). Two rows of the poster have no torchvision builder of
their own, so they are defined here:

* :func:`vit_tiny` — ViT-Tiny / DeiT-Tiny: patch 16, width 192, depth 12, 3 heads, MLP 768.
* :func:`mobilenet_v2_050` — MobileNetV2 with width multiplier 0.5.

Every other name goes to torchvision's builder with ``weights=None`` (and ``weights_backbone=None``),
or, as ``"timm:<name>"``, to :func:`timm.create_model` with ``pretrained=False``: nothing is ever
downloaded.
"""

from __future__ import annotations

import inspect
import json
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


def insert_head_dropout(model: nn.Module, p: float) -> nn.Module:
    """Put ``nn.Dropout(p)`` in front of the model's last ``nn.Linear`` (its classifier), in place.

    ODConv's recipe trains ResNets with dropout before the final fully connected layer; torchvision's
    ResNets have none. Returns ``model``.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("head_dropout needs a model whose classifier is an nn.Linear; found none")
    parent_name, _, child = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Sequential(nn.Dropout(p), getattr(parent, child)))
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny": vit_tiny,
    "mobilenet_v2_050": mobilenet_v2_050,
}

# Builders whose architecture depends on the image size (a ViT's position embeddings).
SIZED_BUILDERS = frozenset({"vit_tiny"})

TIMM_PREFIX = "timm:"

BUILDER_ATTRIBUTE = "lightning_kr_builder"
"""The attribute in which :func:`build_model` records how it built a model (``{"name": ...,
"kwargs": {...}}``: ``build_model(name, **kwargs)`` builds it again). :func:`~lightning_kr.kr_convert`
keeps it and :meth:`~lightning_kr.KRModel.save_pretrained` writes it, so that
:meth:`~lightning_kr.KRModel.from_pretrained` can rebuild the base model."""


def build_model(
    name: str,
    num_classes: int | None = None,
    image_size: int | None = None,
    head_dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """A freshly initialised model (no pretrained weights, nothing downloaded) by builder name.

    The model records how it was built (:func:`builder_record`), so a KR model converted from it can
    be saved and rebuilt from its folder alone.

    Args:
        name: ``"vit_tiny"``, ``"mobilenet_v2_050"``, any name of
            :func:`torchvision.models.list_models` (classifiers such as ``"resnet18"``, and the
            segmentation, detection, video, optical-flow and quantizable builders), or
            ``"timm:<name>"`` for :func:`timm.create_model` (the ``[timm]`` extra).
        num_classes: number of classes ``K`` (default: the builder's own default).
        image_size: side of the input images; passed to the builders whose architecture depends on
            it (ViTs) and ignored by the others.
        head_dropout: dropout in front of the final ``nn.Linear`` (ODConv's ``--dropout``); 0: none.
        kwargs: further builder arguments (``dropout``, ``width_mult``...).

    Returns:
        The model (classifiers map images (B, 3, H, W) to logits (B, K)).

    Raises:
        ValueError: if no builder has this name.
    """
    if name.startswith(TIMM_PREFIX):
        model = _build_timm(name[len(TIMM_PREFIX) :], num_classes, kwargs)
    else:
        model = _build_torchvision(name, num_classes, image_size, kwargs)
    if head_dropout > 0:
        insert_head_dropout(model, head_dropout)
    record = {
        "name": name,
        "kwargs": {
            **({"num_classes": num_classes} if num_classes is not None else {}),
            **({"image_size": image_size} if image_size is not None else {}),
            **({"head_dropout": head_dropout} if head_dropout else {}),
            **kwargs,
        },
    }
    if _is_plain_data(record):
        setattr(model, BUILDER_ATTRIBUTE, record)
    return model


def builder_record(model: nn.Module) -> dict[str, Any] | None:
    """How :func:`build_model` built ``model`` (``build_model(record["name"], **record["kwargs"])``
    builds it again), or ``None`` if it was built otherwise (or with arguments that are not plain
    data, such as a ``norm_layer`` class)."""
    return getattr(model, BUILDER_ATTRIBUTE, None)


def _build_torchvision(
    name: str, num_classes: int | None, image_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    kwargs = dict(kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if image_size is not None and (name in SIZED_BUILDERS or name.startswith("vit_")):
        kwargs.setdefault("image_size", image_size)
    if name in BUILDERS:
        return BUILDERS[name](**kwargs)
    available = torchvision.models.list_models()
    if name not in available:
        raise ValueError(
            f"no model builder is called {name!r}; choose one of {sorted(BUILDERS)}, a "
            f"torchvision builder such as {', '.join(sorted(available)[:8])}, ... "
            "(torchvision.models.list_models()), 'timm:<name>' for a timm model, or pass an "
            "nn.Module"
        )
    builder = torchvision.models.get_model_builder(name)
    parameters = inspect.signature(builder).parameters
    if "weights_backbone" in parameters:  # detection / segmentation: no ImageNet backbone download
        kwargs.setdefault("weights_backbone", None)
    return builder(weights=None, **kwargs)


def _build_timm(name: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"building 'timm:{name}' needs timm: pip install 'lightning-kr[timm]'"
        ) from error
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **kwargs)


def _is_plain_data(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
