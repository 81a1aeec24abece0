"""MACs and parameters of the poster's timm backbones, static and KR, beside the poster's figures.

    python recipes/timm_macs.py                                  # the four rows, 224², batch 1
    python recipes/timm_macs.py --models resnet18 vit_tiny_patch16_224 --json out.json

For ResNet-18, MobileNetV2 0.5x, ViT-Tiny and PoolFormer-S12 (``timm.create_model(name,
pretrained=False)``, 1000 classes), the static model and ``kr_convert(model, kernel_num=1)`` /
``kernel_num=4`` are counted on one image with :func:`lightning_kr.utilities.mac_count.count_macs`
(fvcore, every operator: convolutions and matrix products, normalisation, pooling, elementwise
arithmetic), and once more with convolutions and matrix products only. Needs the ``timm`` extra
(``pip install -e ".[timm]"``); no weights are downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import date
from typing import Any

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.utilities.mac_count import count_macs


@dataclass(frozen=True)
class PosterRow:
    """One backbone of the poster's ImageNet table: its MACs static → KR 1x / KR 4x."""

    label: str
    unit: str  # "G" or "M", as the poster prints it
    static: float
    kr_1x: float
    kr_4x: float


POSTER: dict[str, PosterRow] = {
    "resnet18": PosterRow("ResNet-18", "G", 1.81, 1.85, 1.93),
    "mobilenetv2_050": PosterRow("MobileNetV2 0.5x", "M", 97, 105, 109),
    "vit_tiny_patch16_224": PosterRow("ViT-Tiny", "G", 1.26, 1.27, 1.29),
    "poolformer_s12": PosterRow("PoolFormer-S12", "G", 1.82, 1.84, 1.88),
}

CONFIGS: dict[str, dict[str, Any] | None] = {
    "static": None,
    "kr_1x": {"kernel_num": 1},
    "kr_4x": {"kernel_num": 4},
}

UNITS = {"G": 1e9, "M": 1e6}


def create(name: str, size: int, num_classes: int) -> nn.Module:
    """timm's model with random weights; a ViT's position embedding sized for ``size``."""
    torch.manual_seed(0)
    kwargs = {"img_size": size} if name.startswith("vit_") else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def measure(name: str, size: int, num_classes: int) -> dict[str, dict[str, Any]]:
    """MACs of one image and parameters of the static model and of each KR configuration."""
    static = create(name, size, num_classes)
    image = torch.randn(1, 3, size, size)
    figures = {}
    for config, options in CONFIGS.items():
        model = static if options is None else kr_convert(static, input_size=size, **options)
        count = count_macs(model, image)
        figures[config] = {
            "macs": count.total,
            "contraction_macs": count.contraction_macs,
            "params": count.params,
            "unsupported": count.unsupported,
        }
    return figures


def _triple(texts: list[str], unit: str = "") -> str:
    """``static → kr_1x / kr_4x unit``."""
    static, *kr = texts
    return f"{static} → {' / '.join(kr)} {unit}".rstrip()


def _macs(values: list[float], unit: str) -> str:
    digits = 1 if unit == "M" else 3
    return _triple([f"{v / UNITS[unit]:.{digits}f}" for v in values], unit)


def _overhead(values: list[float]) -> str:
    static, *kr = values
    return " / ".join(f"{v / static - 1:+.1%}" for v in kr)


def render(results: dict[str, dict[str, dict[str, Any]]], size: int) -> Table:
    table = Table(
        title=f"timm backbones, static → KR 1x / KR 4x: MACs of one {size}×{size} image, parameters"
    )
    for column in (
        "model",
        "MACs (every operator)",
        "poster",
        "overhead",
        "poster's overhead",
        "conv + matmul only",
        "params (M)",
    ):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    unsupported: set[str] = set()
    for name, figures in results.items():
        poster = POSTER[name]
        rows = [figures[c] for c in CONFIGS]
        macs = [r["macs"] for r in rows]
        poster_figures = [poster.static, poster.kr_1x, poster.kr_4x]
        table.add_row(
            f"{poster.label} ({name})",
            _macs(macs, poster.unit),
            _triple([f"{v:g}" for v in poster_figures], poster.unit),
            _overhead(macs),
            _overhead(poster_figures),
            _macs([r["contraction_macs"] for r in rows], poster.unit),
            _triple([f"{r['params'] / 1e6:.2f}" for r in rows]),
        )
        for row in rows:
            unsupported.update(row["unsupported"])
    table.caption = "MACs counted by lightning_kr.utilities.mac_count.count_macs (fvcore); " + (
        f"not counted (no handle): {', '.join(sorted(unsupported))}"
        if unsupported
        else "every operator counted."
    )
    return table


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(POSTER), choices=list(POSTER))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(args)


def main(args: list[str] | None = None) -> dict[str, Any]:
    parsed = parse_args(args)
    console = Console(width=None if sys.stdout.isatty() else 180)
    results = {name: measure(name, parsed.image_size, parsed.num_classes) for name in parsed.models}
    console.print(render(results, parsed.image_size))
    report = {
        "command": "python recipes/timm_macs.py "
        + " ".join(sys.argv[1:] if args is None else args),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "image_size": parsed.image_size,
        "batch": 1,
        "num_classes": parsed.num_classes,
        "models": {
            name: {**figures, "poster": vars(POSTER[name])} for name, figures in results.items()
        },
    }
    if parsed.json:
        with open(parsed.json, "w") as handle:
            json.dump(report, handle, indent=2)
        console.print(f"figures written to {parsed.json}")
    return report


if __name__ == "__main__":
    main()
