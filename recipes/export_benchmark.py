"""ONNX export of KR models: one file per configuration, parity and onnxruntime CPU time vs eager.

    python recipes/export_benchmark.py                          # resnet18, 224×224, batch 1 and 8
    python recipes/export_benchmark.py --image-size 32 --batches 1 50
    python recipes/export_benchmark.py --arch vit_tiny --configs static kr_1x --json out.json

Each configuration is exported once with :func:`lightning_kr.export.to_onnx` (a free batch) and run
at every batch size from that one file. Eager PyTorch (``torch.no_grad``, eval mode) and
onnxruntime (CPU execution provider, default options) take turns repetition after repetition; the
median is reported, with the largest absolute difference of their logits (onnxruntime's threads do not
spin between runs, so that they leave the cores to the eager run). Needs the ``export``
extra (``pip install -e ".[export]"``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

# `python recipes/export_benchmark.py` puts recipes/ first on sys.path: the same configurations and
# builder as the speed benchmark.
from benchmark import CONFIGS, build
from rich.console import Console
from rich.table import Table

from lightning_kr.export import to_onnx


def measure(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    import onnxruntime

    rows = []
    for config in args.configs:
        model = build(args.arch, config, args.image_size, torch.device("cpu")).eval()
        path = folder / f"{args.arch}_{config}.onnx"
        start = time.perf_counter()
        to_onnx(model, path, torch.randn(2, 3, args.image_size, args.image_size), verify=False)
        export_s = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        # onnxruntime's threads spin after each run by default and would slow the eager run timed
        # next to it; without spinning both get the cores in turn.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        for batch in args.batches:
            images = torch.randn(batch, 3, args.image_size, args.image_size)
            feed = {name: images.numpy()}
            with torch.no_grad():
                expected = model(images)
                error = (torch.from_numpy(session.run(None, feed)[0]) - expected).abs().max().item()
                for _ in range(args.warmup):
                    model(images)
                    session.run(None, feed)
                eager, ort = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    model(images)
                    eager.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    session.run(None, feed)
                    ort.append(time.perf_counter() - start)
            rows.append(
                {
                    "config": config,
                    "batch": batch,
                    "eager_ms": 1000 * statistics.median(eager),
                    "onnxruntime_ms": 1000 * statistics.median(ort),
                    "max_abs_diff": error,
                    "export_s": export_s,
                    "onnx_mb": path.stat().st_size / 2**20,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def show(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    static = {r["batch"]: r for r in rows if r["config"] == "static"}
    table = Table(
        title=f"{args.arch} {args.image_size}×{args.image_size}: onnxruntime (CPU) vs eager PyTorch, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for column in (
        "config", "batch", "eager ms", "onnxruntime ms", "ort / eager", "ort / static ort",
        "max |ort − eager|", "export s",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "config" else "right")
    for r in rows:
        base = static.get(r["batch"])
        table.add_row(
            r["config"],
            str(r["batch"]),
            f"{r['eager_ms']:.1f}",
            f"{r['onnxruntime_ms']:.1f}",
            f"{r['onnxruntime_ms'] / r['eager_ms']:.2f}",
            "" if base is None else f"{r['onnxruntime_ms'] / base['onnxruntime_ms']:.2f}",
            f"{r['max_abs_diff']:.1e}",
            f"{r['export_s']:.0f}",
        )
    Console().print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--configs", nargs="+", default=["static", "kr_1x", "kr_4x"], choices=sorted(CONFIGS)
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the .onnx files")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        rows = measure(args, folder)
    show(rows, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "date": date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return rows


if __name__ == "__main__":
    main()
