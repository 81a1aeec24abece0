"""The before-stop learning check over many seeds, and what drops in eval mode.

    python recipes/learning_check.py                         # seeds 0-7: static, perturbed static, KR 1x
    python recipes/learning_check.py --seeds 0-15 --json out.json

The protocol of the team's before-stop dynamism check: torchvision ``resnet18(num_classes=10)``, the bundled
digits upsampled to 32×32 RGB, 1,200 training images, 40 plain SGD steps (batch 32, momentum 0.9,
weight decay 1e-4, one-cycle to lr 0.05), test top-1 on the other 597 — here per seed, with the
batches drawn from a generator seeded per run, so every model of a seed sees the same batches.

Rows: ``static``; ``static_perturbed`` (every parameter × (1 + 1e-6) after initialisation: how
chaotic a single eval-mode draw is); ``kr`` (``kr_convert`` defaults). Columns: eval-mode top-1,
top-1 with batch statistics (train-mode BatchNorm), and for KR two paired diagnostics on the same
trained model: eval mode with the attentions (and ``d``) of a batch-statistics pass over the same
images, and eval mode with neutral attentions and no KR head.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.layers.kernel_generator import Attentions, KernelGenerator

MODELS = ("static", "static_perturbed", "kr")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The hook's images, exactly: (1797, 3, 32, 32) in [0, 1] and labels (1797,)."""
    data = load_digits()
    grey = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(grey, size=32, mode="bilinear").repeat(1, 3, 1, 1)
    return images, torch.tensor(data.target)


def build(name: str) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    if name == "kr":
        return kr_convert(model, input_size=32)
    if name == "static_perturbed":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-6)
    return model


def train(name: str, seed: int, images, labels, steps: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    x, y = images[order], labels[order]
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
    torch.manual_seed(seed)
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, xte, yte


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    acc = lambda: (model(x).argmax(1) == y).float().mean().item() * 100  # noqa: E731
    model.eval()
    out = {"eval": acc()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # batch statistics without touching the running ones
    original = KernelGenerator.forward
    captured: list[Attentions] = []
    try:
        KernelGenerator.forward = lambda self, h, d: (
            captured.append(original(self, h, d)) or captured[-1]
        )
        model.train()
        out["train_mode_bn"] = acc()
        if captured:
            replay = iter(captured)
            KernelGenerator.forward = lambda self, h, d: next(replay)
            model.eval()
            out["eval_with_train_mode_attentions"] = acc()
            KernelGenerator.forward = lambda self, h, d: _neutral(original(self, h, d))
            saved = [p.clone() for p in model.head.kr_head.parameters()]
            for p in model.head.kr_head.parameters():
                p.zero_()
            out["eval_with_neutral_attentions"] = acc()
            for p, s in zip(model.head.kr_head.parameters(), saved, strict=True):
                p.copy_(s)
    finally:
        KernelGenerator.forward = original
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return out


def _neutral(att: Attentions) -> Attentions:
    one = lambda t: None if t is None else torch.ones_like(t)  # noqa: E731
    kernel = None if att.kernel is None else torch.full_like(att.kernel, 1 / att.kernel.shape[1])
    return Attentions(one(att.channel), one(att.filter), one(att.spatial), kernel, att.repr_out)


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-7", help="'0-7' or '0,3,5'")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = digits()
    seeds = parse_seeds(args.seeds)
    results: dict[str, Any] = {}
    for name in args.models:
        runs = []
        for seed in seeds:
            model, x, y = train(name, seed, images, labels, args.steps)
            runs.append({"seed": seed, **evaluate(model, x, y)})
            print(json.dumps({"model": name, **runs[-1]}), flush=True)
        results[name] = runs
    table = Table(
        title=f"learning check, {args.steps} steps, seeds {args.seeds}: top-1 mean (min–max)"
    )
    columns = [
        "eval",
        "train_mode_bn",
        "eval_with_train_mode_attentions",
        "eval_with_neutral_attentions",
    ]
    table.add_column("model")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for name, runs in results.items():
        cells = []
        for column in columns:
            values = [r[column] for r in runs if column in r]
            cells.append(
                f"{statistics.mean(values):.1f} ({min(values):.0f}–{max(values):.0f})"
                if values
                else "-"
            )
        table.add_row(name, *cells)
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
