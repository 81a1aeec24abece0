"""How long saving and loading a KR model takes, how big the folder is, and that the round trip is exact.

For each architecture: ``kr_convert`` (with its probe pass), ``save_pretrained``, the folder's size,
``KRModel.from_pretrained`` (rebuilds the base model from the record and converts it without a
probe), and the largest difference between the outputs of the saved and the loaded model (eval
mode; 0 means bit-exact).

    python recipes/pretrained_benchmark.py --arch resnet18 mobilenet_v2_050 vit_tiny --size 224
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lightning_kr import KRModel, kr_convert
from lightning_kr.models import build_model


def measure(arch: str, size: int, kernel_num: int) -> dict[str, float | str]:
    torch.manual_seed(0)
    static = build_model(arch, num_classes=1000, image_size=size)
    start = time.perf_counter()
    model = kr_convert(static, input_size=size, kernel_num=kernel_num).eval()
    convert_s = time.perf_counter() - start
    images = torch.randn(2, 3, size, size)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        model.save_pretrained(folder)
        save_s = time.perf_counter() - start
        megabytes = sum(p.stat().st_size for p in Path(folder).iterdir()) / 1e6
        start = time.perf_counter()
        loaded = KRModel.from_pretrained(folder)
        load_s = time.perf_counter() - start
    with torch.no_grad():
        difference = (model(images) - loaded(images)).abs().max().item()
    return {
        "arch": f"{arch} KR {kernel_num}x",
        "kr_convert_s": convert_s,
        "save_s": save_s,
        "folder_MB": megabytes,
        "from_pretrained_s": load_s,
        "max_abs_difference": difference,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "mobilenet_v2_050", "vit_tiny"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--kernel-num", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    rows = [measure(a, args.size, k) for a in args.arch for k in args.kernel_num]
    print(
        "| model | kr_convert (s) | save_pretrained (s) | folder (MB) | from_pretrained (s) | max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['kr_convert_s']:.2f} | {r['save_s']:.2f} | {r['folder_MB']:.1f} "
            f"| {r['from_pretrained_s']:.2f} | {r['max_abs_difference']:.1g} |"
        )
    return rows


if __name__ == "__main__":
    main()
