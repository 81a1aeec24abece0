"""ONNX export of KR models: one file per configuration, parity and onnxruntime CPU time vs eager.

    python recipes/export_benchmark.py                          # resnet18, 224×224, batch 1 and 8
    python recipes/export_benchmark.py --image-size 32 --batches 1 50
    python recipes/export_benchmark.py --arch vit_tiny --configs static kr_1x --json out.json
    python recipes/export_benchmark.py --configs kr_1x kr_4x --fuse-batchnorm --eager-only

``--fuse-batchnorm`` adds a row per configuration with its BatchNorms folded into the convolutions
(:func:`lightning_kr.fuse_batchnorm`), timed in turns with the unfolded model and reported as a
ratio to it; ``--eager-only`` skips the export and onnxruntime.

Each configuration is exported once with :func:`lightning_kr.export.to_onnx` (a free batch) and run
at every batch size from that one file. Eager PyTorch (``torch.no_grad``, eval mode) and
onnxruntime (CPU execution provider, default options) take turns repetition after repetition; the
median is reported, with the largest absolute difference of their logits (onnxruntime's threads do not
spin between runs, so that they leave the cores to the eager run). Needs the ``export``
extra (``pip install -e ".[export]"``).
"""

from __future__ import annotations

import argparse
import copy
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

from lightning_kr import fuse_batchnorm
from lightning_kr.export import to_onnx


def variants(args: argparse.Namespace, config: str) -> list[tuple[str, torch.nn.Module]]:
    """``(label, model)``: the configuration, and with ``--fuse-batchnorm`` its folded twin."""
    model = build(args.arch, config, args.image_size, torch.device("cpu")).eval()
    if not args.fuse_batchnorm:
        return [(config, model)]
    return [(config, model), (f"{config}+fused", fuse_batchnorm(copy.deepcopy(model)))]


def onnx_session(model: torch.nn.Module, path: Path, args: argparse.Namespace) -> Any:
    import onnxruntime

    to_onnx(model, path, torch.randn(2, 3, args.image_size, args.image_size), verify=False)
    options = onnxruntime.SessionOptions()
    # onnxruntime's threads spin after each run by default and would slow the eager run timed
    # next to it; without spinning both get the cores in turn.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for config in args.configs:
        models = variants(args, config)
        sessions, export_s, onnx_mb = {}, {}, {}
        for label, model in models if not args.eager_only else ():
            path = folder / f"{args.arch}_{label}.onnx"
            start = time.perf_counter()
            sessions[label] = onnx_session(model, path, args)
            export_s[label] = time.perf_counter() - start
            onnx_mb[label] = path.stat().st_size / 2**20
        for batch in args.batches:
            images = torch.randn(batch, 3, args.image_size, args.image_size)
            eager = {label: [] for label, _ in models}
            ort = {label: [] for label in sessions}
            with torch.no_grad():
                reference = models[0][1](images)
                errors = {
                    label: (model(images) - reference).abs().max().item() for label, model in models
                }
                feeds = {
                    label: {s.get_inputs()[0].name: images.numpy()} for label, s in sessions.items()
                }
                for label, session in sessions.items():
                    got = torch.from_numpy(session.run(None, feeds[label])[0])
                    errors[label] = (got - reference).abs().max().item()
                # Every model and session in turn, repetition after repetition.
                for repeat in range(args.warmup + args.repeats):
                    for label, model in models:
                        start = time.perf_counter()
                        model(images)
                        if repeat >= args.warmup:
                            eager[label].append(time.perf_counter() - start)
                        if label in sessions:
                            start = time.perf_counter()
                            sessions[label].run(None, feeds[label])
                            if repeat >= args.warmup:
                                ort[label].append(time.perf_counter() - start)
            for label, _ in models:
                rows.append(
                    {
                        "config": label,
                        "batch": batch,
                        "eager_ms": 1000 * statistics.median(eager[label]),
                        "onnxruntime_ms": 1000 * statistics.median(ort[label])
                        if ort.get(label)
                        else None,
                        "max_abs_diff": errors[label],
                        "export_s": export_s.get(label),
                        "onnx_mb": onnx_mb.get(label),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def show(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    static = {r["batch"]: r for r in rows if r["config"] == "static"}
    unfolded = {(r["config"], r["batch"]): r for r in rows}
    table = Table(
        title=f"{args.arch} {args.image_size}×{args.image_size}: onnxruntime (CPU) vs eager PyTorch, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for column in (
        "config", "batch", "eager ms", "onnxruntime ms", "ort / eager", "ort / static ort",
        "fused / unfused eager", "max |diff|", "export s",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "config" else "right")

    def number(value: float | None, form: str) -> str:
        return "" if value is None else format(value, form)

    for r in rows:
        base = static.get(r["batch"])
        ort = r["onnxruntime_ms"]
        twin = unfolded.get((r["config"].removesuffix("+fused"), r["batch"]))
        fused = r["config"].endswith("+fused") and twin is not None
        table.add_row(
            r["config"],
            str(r["batch"]),
            f"{r['eager_ms']:.1f}",
            number(ort, ".1f"),
            number(None if ort is None else ort / r["eager_ms"], ".2f"),
            number(None if base is None or ort is None else ort / base["onnxruntime_ms"], ".2f"),
            number(r["eager_ms"] / twin["eager_ms"] if fused else None, ".3f"),
            f"{r['max_abs_diff']:.1e}",
            number(r["export_s"], ".0f"),
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
    parser.add_argument(
        "--fuse-batchnorm",
        action="store_true",
        help="add each configuration with its BatchNorms folded (fuse_batchnorm), timed in turns",
    )
    parser.add_argument("--eager-only", action="store_true", help="no export, no onnxruntime")
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
