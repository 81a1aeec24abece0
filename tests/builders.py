"""Every torchvision builder as a training step would run it: its family, an example, a loss.

Used by tests/test_torchvision_builders.py and recipes/builder_coverage.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import get_model, list_models

FAMILIES = {
    "classification": torchvision.models,
    "segmentation": torchvision.models.segmentation,
    "detection": torchvision.models.detection,
    "video": torchvision.models.video,
    "optical_flow": torchvision.models.optical_flow,
    "quantization": torchvision.models.quantization,
}
CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def builders() -> dict[str, str]:
    """Every builder name → its family (121 with torchvision 0.29)."""
    return {
        name: family for family, module in FAMILIES.items() for name in list_models(module=module)
    }


def family_of(name: str) -> str:
    return builders()[name]


def build(name: str) -> nn.Module:
    """A freshly initialised model (nothing downloaded)."""
    family = family_of(name)
    kwargs: dict[str, Any] = {"weights": None}
    if family in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if family == "quantization":
        kwargs["quantize"] = False
    return get_model(name, **kwargs)


def standard_size(name: str) -> tuple[int, ...]:
    """The input a builder is trained at: images (H, W), videos (T, H, W)."""
    family = family_of(name)
    if family == "video":
        return (16, 224, 224) if name.startswith(("mvit", "swin3d", "s3d")) else (16, 112, 112)
    if family == "segmentation":
        return (520, 520)
    if family == "detection":
        return (320, 320) if "320" in name else (300, 300) if "ssd300" in name else (512, 512)
    if family == "optical_flow":
        return (368, 496)
    if "inception" in name:
        return (299, 299)
    return (224, 224)


def small_size(name: str) -> tuple[int, ...]:
    """The smallest input each builder accepts in training (fast CI)."""
    family = family_of(name)
    if family == "video":
        return standard_size(name) if name.startswith(("mvit", "s3d")) else (4, 64, 64)
    if family == "optical_flow":
        return (128, 128)
    if family in ("segmentation", "detection"):
        return (64, 64) if family == "segmentation" else standard_size(name)
    if name.startswith(("vit_", "maxvit")) or "inception" in name:
        return standard_size(name)  # fixed image sizes; Inception's auxiliary head needs 299
    if name.startswith(("swin", "alexnet")):
        return (64, 64)
    return (32, 32)


def example(name: str, size: tuple[int, ...], batch: int = 2) -> tuple:
    """The positional arguments of one training step."""
    family = family_of(name)
    generator = torch.Generator().manual_seed(0)
    if family == "detection":
        images = [torch.rand(3, *size, generator=generator) for _ in range(batch)]
        return images, [_detection_target(size) for _ in range(batch)]
    images = torch.randn(batch, 3, *size, generator=generator)
    if family == "optical_flow":
        return images, torch.randn(batch, 3, *size, generator=generator)
    return (images,)


def _detection_target(size: tuple[int, ...]) -> dict[str, Tensor]:
    h, w = size
    box = torch.tensor([[0.1 * w, 0.15 * h, 0.6 * w, 0.7 * h]])
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, int(0.15 * h) : int(0.7 * h), int(0.1 * w) : int(0.6 * w)] = 1
    keypoints = torch.tensor([[[0.3 * w, 0.4 * h, 1.0]] * 17])
    return {"boxes": box, "labels": torch.tensor([1]), "masks": masks, "keypoints": keypoints}


def training_loss(output: Any) -> Tensor:
    """A scalar from any model output: logits, dicts of maps or losses, lists of flows."""
    if isinstance(output, Tensor):
        return output.float().logsumexp(1).mean() if output.dim() == 2 else output.float().mean()
    if isinstance(output, dict):
        return sum(training_loss(v) for v in output.values() if isinstance(v, Tensor))
    if isinstance(output, list | tuple):
        return sum(training_loss(v) for v in output if isinstance(v, Tensor | dict | list))
    raise TypeError(f"no loss for an output of type {type(output).__name__}")


def converted_fraction(static: nn.Module, converted: nn.Module) -> float:
    """Fraction of ``static``'s Conv/Linear layers that are KR layers after the conversion (the first
    layer and a classifier's final layer excepted)."""
    from lightning_kr.layers import KRLayer

    report = converted.report
    names = [
        n
        for n, m in static.named_modules()
        if isinstance(m, CONV_LINEAR) and n not in (report.first_layer, report.classifier)
    ]

    def is_kr(name: str) -> bool:
        try:
            return isinstance(converted.backbone.get_submodule(name), KRLayer)
        except AttributeError:
            return False

    return sum(map(is_kr, names)) / max(1, len(names))
