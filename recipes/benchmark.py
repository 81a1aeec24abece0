"""Speed, memory, MACs and parameters of KR models against their static architecture.

    python recipes/benchmark.py                       # resnet18 at 224² and 32², CPU (and CUDA)
    python recipes/benchmark.py --image-size 32 --configs kr_1x kr_4x odconv_4x
    python recipes/benchmark.py --image-size 32 --configs kr_1x kr_4x --compile --no-memory
    python recipes/benchmark.py --arch mobilenet_v2_050 --json out.json
    python recipes/benchmark.py --arch vit_tiny --configs static kr_1x kr_4x

Each ``--image-size`` is one table (default: 224² and the CIFAR-sized 32², where the last stages of
a ResNet run on 2×2 and 1×1 maps). Batches default by size (:data:`BATCHES`: 224² inference 32,
train step 16; 32² both 50); ``--batch`` / ``--train-batch`` / ``--memory-batch`` override them.
Beside each time ratio the table gives the MAC ratio to the static model: the physical limit a
time ratio is measured against. ``--compile`` adds every configuration under ``torch.compile``
(inductor), timed beside its eager self; compiled rows are ratios to the compiled static model.

Every configuration is built in one process and timed side by side: for each figure the
configurations take turns, repetition after repetition (so drifting machine load hits all of them
alike), after warm-up; the median is reported. Peak train memory is measured for each configuration
in processes of its own (CPU: growth of the peak resident set over one training step, with glibc
returning blocks of 1 MiB or more to the OS when freed, median of three processes; CUDA:
``torch.cuda.max_memory_allocated``). MACs are counted with fvcore by
:func:`lightning_kr.utilities.mac_count.count_macs` (every operator of the KR layers, the FFT stem and
the joint head has a handle).

Configurations: ``static`` (the torchvision model), ``kr_1x`` / ``kr_4x`` (``kr_convert`` with 1 or 4
candidate kernels), ``odconv_1x`` / ``odconv_4x`` (the "KR off" ablation), ``reference_1x`` /
``reference_4x`` (KR computed by the textbook method: full per-sample kernels through one
``groups = B`` convolution, as ODConv's code does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.models import build_model

CONFIGS: dict[str, dict[str, Any] | None] = {
    "static": None,
    "kr_1x": {"kernel_num": 1},
    "kr_4x": {"kernel_num": 4},
    "odconv_1x": {"kernel_num": 1, "mode": "odconv"},
    "odconv_4x": {"kernel_num": 4, "mode": "odconv"},
    "reference_1x": {"kernel_num": 1, "strategy": "reference"},
    "reference_4x": {"kernel_num": 4, "strategy": "reference"},
}

# The speed issues' targets for kr_convert(resnet18()), per image size (ratios to static; MACs in
# G at 224² beside the poster's; params in M).
RESNET18_TARGETS: dict[int, dict[str, dict[str, float]]] = {
    224: {
        "kr_1x": {
            "infer": 1.15,
            "train": 1.25,
            "infer_b1": 1.25,
            "memory": 1.2,
            "gmacs": 1.85,
            "params_m": 12.0,
        },
        "kr_4x": {
            "infer": 1.4,
            "train": 1.6,
            "infer_b1": 1.5,
            "memory": 1.3,
            "gmacs": 1.93,
            "params_m": 45.0,
        },
    },
    32: {
        "kr_1x": {"infer": 1.3, "train": 1.3},
        "kr_4x": {"infer": 3.0, "train": 3.0},
    },
}

# (inference, train step, peak-memory) batch per image size; other sizes take 224²'s.
BATCHES: dict[int, tuple[int, int, int]] = {224: (32, 16, 32), 32: (50, 50, 50)}


def build(arch: str, config: str, size: int, device: torch.device) -> nn.Module:
    """The model of one configuration, on ``device``."""
    torch.manual_seed(0)
    static = build_model(arch, num_classes=1000, image_size=size)
    options = CONFIGS[config]
    model = static if options is None else kr_convert(static, input_size=size, **options)
    return model.to(device)


def logits_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward and backward (no optimiser step), gradients cleared first."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits_of(model(images)), labels).backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK: Callable[[], float] = time.perf_counter


def time_side_by_side(
    runs: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of each callable; configurations take turns in every repetition.

    The clock is the wall clock, or the process's CPU time with ``--cpu-time`` (steadier on a
    machine that other jobs share; use it with ``--threads 1``).
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = CLOCK()
            run()
            synchronize(device)
            samples[name].append(CLOCK() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


MEMORY_RUNS = 3
# glibc keeps freed heap blocks resident and its mmap threshold grows with the largest block freed,
# so a process's peak resident set also counts memory that is free but not returned: the same step
# measured 1.09 to 1.19 GiB from run to run. Blocks of 1 MiB or more go straight to mmap and back to
# the OS when freed; the peak then follows the tensors alive at once (same rule for every config).
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def peak_train_memory(
    arch: str, config: str, size: int, batch: int, device: torch.device, runs: int = MEMORY_RUNS
) -> int:
    """Peak memory (bytes) of one training step: median of ``runs`` processes of its own (CPU)."""
    command = [
        sys.executable, __file__, "--memory-child", config, "--arch", arch, "--size", str(size),
        "--memory-batch", str(batch), "--device", device.type,
    ]  # fmt: skip
    env = {**os.environ, **MEMORY_CHILD_ENV}
    peaks = []
    for _ in range(runs if device.type == "cpu" else 1):
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"memory measurement of {config} failed:\n{result.stderr[-2000:]}")
        peaks.append(int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]))
    return int(statistics.median(peaks))


def _memory_child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model = build(args.arch, args.memory_child, args.size, device).train()
    images = torch.randn(args.memory_batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.memory_batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        train_step(model, images, labels)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        # How far one step raises the resident set over the ready-to-train state. Linux lets a
        # process reset its peak (VmHWM) by writing 5 to /proc/self/clear_refs.
        gc.collect()
        base = _reset_peak_rss()
        train_step(model, images, labels)
        peak = _peak_rss() - base
    print(json.dumps({"peak_bytes": peak}))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the peak resident set (where the OS allows) and return the current one, in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_gmacs(model: nn.Module, size: int, device: torch.device) -> float:
    from lightning_kr.utilities.mac_count import count_macs

    result = count_macs(model, torch.randn(1, 3, size, size, device=device))
    if result.unsupported:
        Console(stderr=True).print(f"[yellow]uncounted operators: {result.unsupported}[/yellow]")
    return result.total / 1e9


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Every figure of every configuration at ``args.size`` with ``args``' batches."""
    torch.manual_seed(0)
    models = {c: build(args.arch, c, args.size, device) for c in args.configs}
    eager_configs = list(models)
    if args.compile:
        # torch.compile (inductor) of the same modules: eager and compiled side by side.
        for config in eager_configs:
            models[f"{config}+compile"] = torch.compile(models[config])
    size = args.size
    batch_images = torch.randn(args.batch, 3, size, size, device=device)
    one_image = batch_images[:1].contiguous()
    train_images = torch.randn(args.train_batch, 3, size, size, device=device)
    train_labels = torch.randint(0, 1000, (args.train_batch,), device=device)

    def infer(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(images)

        return run

    results: dict[str, dict[str, float]] = {c: {} for c in models}
    for model in models.values():
        model.eval()
    for name, seconds in time_side_by_side(
        {c: infer(m, batch_images) for c, m in models.items()}, device, args.warmup, args.repeats
    ).items():
        results[name]["infer_s"] = seconds
    for name, seconds in time_side_by_side(
        {c: infer(m, one_image) for c, m in models.items()}, device, args.warmup, args.repeats * 3
    ).items():
        results[name]["infer_b1_s"] = seconds
    for model in models.values():
        model.train()
    for name, seconds in time_side_by_side(
        {c: (lambda m=m: train_step(m, train_images, train_labels)) for c, m in models.items()},
        device,
        args.warmup,
        args.repeats,
    ).items():
        results[name]["train_s"] = seconds
    for config in eager_configs:
        model = models[config].eval()
        results[config]["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if not args.no_macs:
            results[config]["gmacs"] = count_gmacs(model, size, device)
        if args.compile:  # the same model: the same parameters and MACs
            results[f"{config}+compile"].update(
                {k: v for k, v in results[config].items() if k in ("params_m", "gmacs")}
            )
    del models
    if not args.no_memory:
        for config in args.configs:
            results[config]["memory_bytes"] = peak_train_memory(
                args.arch, config, size, args.memory_batch, device, args.memory_runs
            )
    return results


def render(
    results: dict[str, dict[str, float]], args: argparse.Namespace, device: torch.device
) -> Table:
    targets = RESNET18_TARGETS.get(args.size, {}) if args.arch == "resnet18" else {}
    title = (
        f"{args.arch} on {device_name(device)}, {date.today().isoformat()}: inference batch "
        f"{args.batch}, train step batch {args.train_batch}, memory batch {args.memory_batch}, "
        f"{args.size}², median of {args.repeats}"
    )
    table = Table(title=title)
    columns = [
        ("infer_s", f"inference b{args.batch}", "infer"),
        ("train_s", f"train step b{args.train_batch}", "train"),
        ("infer_b1_s", "inference b1", "infer_b1"),
        ("memory_bytes", f"peak train memory b{args.memory_batch}", "memory"),
    ]
    table.add_column("config", no_wrap=True)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("GMACs", justify="right")
    table.add_column("MAC ratio", justify="right")
    table.add_column("params (M)", justify="right")
    for config, row in results.items():
        # Compiled rows against the compiled static model.
        compiled = config.endswith("+compile")
        static = results.get("static+compile" if compiled else "static", {})
        cells = [config]
        for key, _, target_key in columns:
            if key not in row:
                cells.append("-")
                continue
            value = row[key]
            absolute = (
                f"{value / 2**30:.2f} GiB" if key == "memory_bytes" else f"{value * 1e3:.0f} ms"
            )
            if config.startswith("static") or key not in static:
                cells.append(absolute)
                continue
            ratio = value / max(static[key], 1e-12)
            target = None if compiled else targets.get(config, {}).get(target_key)
            mark = "" if target is None else (" ✓" if ratio <= target else f" ✗ (≤{target})")
            cells.append(f"{ratio:.2f}x{mark}")
        gmacs = row.get("gmacs")
        target = targets.get(config, {}).get("gmacs")
        mark = (
            ""
            if gmacs is None or target is None
            else (" ✓" if gmacs <= target else f" ✗ (≤{target})")
        )
        cells.append("-" if gmacs is None else f"{gmacs:.3f}{mark}")
        ratio = mac_ratio(row, static)
        cells.append("-" if ratio is None else f"{ratio:.2f}x")
        target = targets.get(config, {}).get("params_m")
        mark = "" if target is None else (" ✓" if row["params_m"] <= target else f" ✗ (≤{target})")
        cells.append(f"{row['params_m']:.2f}{mark}")
        table.add_row(*cells)
    return table


def mac_ratio(row: dict[str, float], static: dict[str, float]) -> float | None:
    """MACs of one configuration over the static model's (per image), or ``None`` if uncounted."""
    if "gmacs" not in row or not static.get("gmacs"):
        return None
    return row["gmacs"] / static["gmacs"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="resnet18", help="torchvision builder, vit_tiny or mobilenet_v2_050"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--image-size", "--size", dest="sizes", type=int, nargs="+", default=[224, 32],
        help="input side(s); one table each",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, default=None, help="inference batch (default: by size)"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="default: by size")
    parser.add_argument("--memory-batch", type=int, default=None, help="default: by size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (every available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time with process CPU time (CPU only)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time every configuration under torch.compile (rows '<config>+compile')",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--memory-runs", type=int, default=MEMORY_RUNS, help="CPU: processes per memory figure"
    )
    parser.add_argument("--no-macs", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.sizes[0]
    if "static" not in args.configs:
        args.configs = ["static", *args.configs]
    return args


def sized_args(args: argparse.Namespace, size: int) -> argparse.Namespace:
    """``args`` for one image size: the batches not given on the command line from :data:`BATCHES`."""
    infer, train, memory = BATCHES.get(size, BATCHES[224])
    return argparse.Namespace(
        **{
            **vars(args),
            "size": size,
            "batch": args.batch or infer,
            "train_batch": args.train_batch or train,
            "memory_batch": args.memory_batch or memory,
        }
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.memory_child:
        _memory_child(args)
        return {}
    if args.device == "auto":
        devices = [torch.device("cpu")] + (
            [torch.device("cuda")] if torch.cuda.is_available() else []
        )
    else:
        devices = [torch.device(args.device)]
    console = Console(width=None if sys.stdout.isatty() else 180)
    report: dict[str, Any] = {
        "arch": args.arch,
        "date": date.today().isoformat(),
        "command": "python recipes/benchmark.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "runs": [],
    }
    for device in devices:
        for size in args.sizes:
            sized = sized_args(args, size)
            results = measure(sized, device)
            console.print(render(results, sized, device))
            report["runs"].append(
                {
                    "device": device_name(device),
                    "image_size": size,
                    "batches": {
                        "infer": sized.batch,
                        "train": sized.train_batch,
                        "memory": sized.memory_batch,
                    },
                    "results": results,
                }
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        console.print(f"figures written to {args.json}")
    return report


if __name__ == "__main__":
    main()
