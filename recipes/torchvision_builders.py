"""kr_convert on every torchvision builder: one training step each, and how much became KR.

    python recipes/torchvision_builders.py                         # all 121 at their standard input
    python recipes/torchvision_builders.py --family detection video --size small
    python recipes/torchvision_builders.py --names swin_t raft_small --json figures.json

For each builder: its family, the example a training step passes (images; ``(images, targets)``
for detection; ``(image1, image2)`` for optical flow; videos (B, 3, T, H, W)), one forward and
backward in training mode after ``kr_convert``, whether every trainable parameter got a gradient,
the share of its Conv/Linear layers that became KR layers (first layer and a classifier's final
layer excepted) and what stayed static, with why. tests/test_torchvision_builders.py runs the same
function.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import list_models

from lightning_kr.models import build_model

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
    """A freshly initialised model (nothing downloaded; quantizable models in float)."""
    return build_model(name)


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


def convert_and_train_step(name: str, size: tuple[int, ...]) -> dict[str, Any]:
    """Convert builder ``name`` and run one training step on an example of ``size``."""
    from lightning_kr import kr_convert

    static = build(name)
    args = example(name, size)
    start = time.perf_counter()
    model = kr_convert(static, example_input=args)
    model.train()
    training_loss(model(*args)).backward()
    untrained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    report = model.report
    return {
        "name": name,
        "family": family_of(name),
        "size": list(size),
        "probe_mode": report.probe_mode,
        "joint_head": model.head is not None,
        "output": report.output,
        "kr_fraction": converted_fraction(static, model),
        "replaced": len(report.replaced),
        "skipped": {d.name: d.reason for d in report.skipped},
        "untrained": untrained,
        "finite_gradients": finite,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="*", choices=sorted(FAMILIES), default=None)
    parser.add_argument("--names", nargs="*", default=None)
    parser.add_argument("--size", choices=("standard", "small"), default="standard")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    names = [
        n
        for n, family in builders().items()
        if (options.names is None or n in options.names)
        and (options.family is None or family in options.family)
    ]
    console = Console()
    results = []
    for name in names:
        size = standard_size(name) if options.size == "standard" else small_size(name)
        try:
            result = convert_and_train_step(name, size)
        except Exception as error:  # reported, not hidden: the table shows it
            result = {
                "name": name,
                "family": family_of(name),
                "error": f"{type(error).__name__}: {error}",
            }
        results.append(result)
        console.print(_line(result))
    table = Table(title="kr_convert on torchvision's builders (one training step each)")
    for column in (
        "family",
        "builders",
        "train a step",
        "every parameter trained",
        "KR share (min / median)",
        "stays static (count: reason)",
    ):
        table.add_column(column)
    for family in sorted({r["family"] for r in results}):
        rows = [r for r in results if r["family"] == family]
        ok = [r for r in rows if "error" not in r]
        trained = [r for r in ok if not r["untrained"] and r["finite_gradients"]]
        shares = sorted(r["kr_fraction"] for r in ok)
        reasons = Counter(
            reason.split(":")[0].split(" (")[0] for r in ok for reason in r["skipped"].values()
        )
        table.add_row(
            family,
            str(len(rows)),
            f"{len(ok)} / {len(rows)}",
            f"{len(trained)} / {len(rows)}",
            f"{shares[0]:.0%} / {shares[len(shares) // 2]:.0%}" if shares else "-",
            "; ".join(f"{n}: {r}" for r, n in reasons.most_common()),
        )
    console.print(table)
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "command": "python " + " ".join(sys.argv),
                    "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__,
                    "torchvision": torchvision.__version__,
                    "results": results,
                },
                indent=1,
            )
        )
    return results


def _line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"[red]{result['name']}: {result['error'][:300]}[/red]"
    return (
        f"{result['name']} ({result['family']}, {result['size']}): KR {result['kr_fraction']:.0%}, "
        f"{result['replaced']} replaced, head={result['joint_head']}, probe={result['probe_mode']}, "
        f"untrained={len(result['untrained'])}, {result['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
