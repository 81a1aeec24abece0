"""Where the time of one training step goes: ``torch.profiler``'s operator table for one configuration.

    python recipes/profile_step.py                          # KR 1x resnet18, train step batch 16
    python recipes/profile_step.py --config kr_4x --threads 1 --rows 15
    python recipes/profile_step.py --config static --inference --batch 1

The configurations are those of ``recipes/benchmark.py``. Two warm-up steps, then ``--steps`` profiled
steps; operators are sorted by self CPU time (time inside the operator, not its callees), so the top
rows are the costs to attack.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def _benchmark() -> Any:
    spec = importlib.util.spec_from_file_location(
        "benchmark", Path(__file__).with_name("benchmark.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> list[tuple[str, float, int]]:
    """Print the operator table; return ``(operator, self CPU ms per step, calls per step)`` rows."""
    bench = _benchmark()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--config", default="kr_1x", choices=list(bench.CONFIGS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", "--size", dest="size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--inference", action="store_true", help="profile inference instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = bench.build(args.arch, args.config, args.size, device)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))

    def step() -> None:
        if args.inference:
            with torch.inference_mode():
                model(images)
        else:
            bench.train_step(model, images, labels)

    model.train(not args.inference)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    ranked = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)
    return [
        (e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps)
        for e in ranked[: args.rows]
    ]


if __name__ == "__main__":
    main()
