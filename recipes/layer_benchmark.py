"""Per-layer timing of every per-sample-kernel strategy against the static convolution.

    python recipes/layer_benchmark.py                 # ResNet-18 layer shapes, batch 32, CPU
    python recipes/layer_benchmark.py --scale 7 --batch 50   # the same layers at 32² input (8² … 1² maps)
    python recipes/layer_benchmark.py --batch 16 --threads 1 --cpu-time

It is the measurement behind the strategies' costs (:mod:`lightning_kr.strategies`, what ``"auto"``
compares): each row is one convolution shape, each cell the time of a registered 2-D strategy over
the static ``F.conv2d`` of the same shape (1x and 4x candidate kernels, spatial attention on). ``--cpu-time`` times with the process's CPU
time, which a busy machine disturbs less than the wall clock (use it with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from lightning_kr.layers.dynamic_conv import dynamic_conv2d
from lightning_kr.strategies import ConvGeometry, registry

# (C_in, C_out, input side, stride, kernel) of ResNet-18's convolutions at 224².
RESNET18_SHAPES = [
    (64, 64, 56, 1, 3),
    (64, 128, 56, 2, 3),
    (128, 128, 28, 1, 3),
    (128, 256, 28, 2, 3),
    (256, 256, 14, 1, 3),
    (256, 512, 14, 2, 3),
    (512, 512, 7, 1, 3),
    (64, 128, 56, 2, 1),
    (256, 512, 14, 2, 1),
]
STRATEGIES = tuple(name for name in registry.names(2) if name != "shared")  # "static" is shared


def geometry(
    batch: int, c_in: int, c_out: int, side: int, stride: int, kernel: int, kernel_num: int
) -> ConvGeometry:
    """One row's call: spatial attention where the kernel has several taps, kernel attention where
    there are several candidates, ``kernel // 2`` zero padding."""
    pad = kernel // 2
    out = (side + 2 * pad - kernel) // stride + 1
    present = {"spatial": kernel > 1, "kernel": kernel_num > 1}
    return ConvGeometry(
        weight_shape=(kernel_num, c_out, c_in, kernel, kernel),
        stride=(stride, stride),
        dilation=(1, 1),
        groups=1,
        attentions=frozenset(kind for kind, on in present.items() if on),
        batch=batch,
        in_size=(side, side),
        out_size=(out, out),
        padding=(pad, pad),
    )


def applicable(strategy: str, call: ConvGeometry) -> bool:
    return registry.get(strategy, 2).applies(call) is None


def timer(cpu_time: bool) -> Callable[[], float]:
    return time.process_time if cpu_time else time.perf_counter


def bench(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true")
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="divide every side by this (7: the maps of a 32² input; 8 with batch 2: smoke runs)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = timer(args.cpu_time)
    table = Table(
        title=f"per-sample strategies / static conv, batch {args.batch} (auto choice in bold)"
    )
    table.add_column("shape (C_in→C_out, side, stride, k)")
    table.add_column("static")
    for n in (1, 4):
        for strategy in STRATEGIES:
            table.add_column(f"{n}x {strategy}", justify="right")
    rows = []
    for c_in, c_out, side, stride, kernel in RESNET18_SHAPES:
        side = max(side // args.scale, 1)
        x = torch.randn(args.batch, c_in, side, side)
        pad = kernel // 2
        spatial = torch.rand(args.batch, kernel * kernel) if kernel > 1 else None
        with torch.no_grad():
            static_w = torch.randn(c_out, c_in, kernel, kernel)
            static = bench(partial(F.conv2d, x, static_w, None, stride, pad), args.repeats, clock)
            cells = [
                f"{c_in}→{c_out}, {side}², s{stride}, {kernel}x{kernel}",
                f"{static * 1e3:.1f} ms",
            ]
            row = {"shape": (c_in, c_out, side, stride, kernel), "static_s": static}
            for n in (1, 4):
                weight = torch.randn(n, c_out, c_in, kernel, kernel)
                kernel_att = torch.softmax(torch.randn(args.batch, n), 1) if n > 1 else None
                call = geometry(args.batch, c_in, c_out, side, stride, kernel, n)
                auto = registry.choose(call).name
                for strategy in STRATEGIES:
                    if not applicable(strategy, call):
                        cells.append("")
                        continue
                    layer = partial(
                        dynamic_conv2d, x, weight, channel_att=None, filter_att=None,
                        spatial_att=spatial, kernel_att=kernel_att, bias=None,
                        stride=(stride, stride), padding=(pad, pad, pad, pad), dilation=(1, 1),
                        groups=1, strategy=strategy,
                    )  # fmt: skip
                    seconds = bench(layer, args.repeats, clock)
                    ratio = seconds / static
                    row[f"{n}x_{strategy}"] = ratio
                    cells.append(
                        f"[bold]{ratio:.2f}[/bold]" if strategy == auto else f"{ratio:.2f}"
                    )
            table.add_row(*cells)
            rows.append(row)
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    return rows


if __name__ == "__main__":
    main()
