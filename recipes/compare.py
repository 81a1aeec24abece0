"""Do KR models learn? Static, DyConv, ODConv and KR trained side by side, from scratch, same everything.

    python recipes/compare.py                                  # digits, resnet18, 7 configurations, 3 seeds
    python recipes/compare.py --configs static kr_1x odconv_1x --seeds 5
    python recipes/compare.py --tsne                           # + t-SNE of the per-image kernels
    python recipes/compare.py --kr dynamism_floor=0 gate_range=1     # KR options for every config
    python recipes/compare.py --data-root /data/imagenet --train-per-class 20 --image-size 64

A plain PyTorch loop (no Lightning, no callback, no special learning rate): what a user who calls
``kr_convert(model)`` with the library's defaults gets. Every configuration sees the same training
images in the same order, from the same initial backbone weights, for each seed; the optimiser is SGD
with momentum 0.9 and weight decay 1e-4 under a one-cycle schedule peaking at ``--lr``. The protocol
is deliberately small (600 training images, 5 epochs of 12 steps), so that how fast a model learns
separates the configurations, and long enough (60 steps) that BatchNorm's running statistics, which
the test accuracy in eval mode relies on, have forgotten their initial values (after 20 steps they
still weigh 12 %: every model then scores near chance in eval mode, whatever it learned).

Data: the 1,797 handwritten digits that ship inside scikit-learn, as 32×32 RGB images, split into a
stratified training subset of ``--train-images`` and a test set of the rest; or, with
``--data-root``, an ImageNet-layout folder (``train/<class>/*``, ``val/<class>/*``), of which
``--train-per-class`` training images per class are used (``--classes`` limits the classes).

Printed (a rich table) and written to ``<out>/compare.json`` and ``<out>/learning_curves.png``:

* test top-1 after the last epoch, mean ± sd over seeds (and each seed);
* the training loss curve: mean over the first and the last quarter of the steps;
* kernel cluster scores on the test images: the silhouette score and the k-NN label purity of the
  per-sample kernel descriptor, the concatenated attention vectors (input-channel, filter, spatial,
  kernel-number) of the last KR layer in execution order — the same space for KR and the ODConv
  ablation (DyConv 4x has only kernel-number attention; static and DyConv 1x have none);
* the median time of a training step;
* with ``--tsne``, ``<out>/kernels_tsne.png``: a t-SNE of those per-image descriptors for every
  configuration that has them (seed 0), coloured by class, titled with spread and k-NN purity.

Configurations: ``static`` and ``<mode>_<n>x`` for mode ``kr``, ``odconv``, ``dyconv`` and any ``n``
(``kr_convert(model, mode=..., kernel_num=n)``); ``<config>+anneal`` anneals the attention
temperature 30 → 1 over the first half of the steps (the poster's recipe, done in the loop).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from lightning_kr import KRConfig, KRModel, kr_convert
from lightning_kr.data.digits import digit_images
from lightning_kr.diagnostics import AttentionStatistics, kernel_generators
from lightning_kr.layers import ATTENTION_KINDS, Attentions
from lightning_kr.models import build_model
from lightning_kr.utilities.embeddings import cluster_scores, plot_embeddings, tsne_panel

DEFAULT_CONFIGS = (
    "static",
    "dyconv_1x",
    "odconv_1x",
    "kr_1x",
    "dyconv_4x",
    "odconv_4x",
    "kr_4x",
)
MODES = ("kr", "odconv", "dyconv")
ANNEAL_SUFFIX = "+anneal"


@dataclass(frozen=True)
class Config:
    """One configuration: ``static``, or ``kr_convert`` options and whether T is annealed."""

    name: str
    convert: dict[str, Any] | None
    anneal: bool = False


def parse_option(item: str) -> tuple[str, Any]:
    """``"attention_norm=layer"`` → ``("attention_norm", "layer")``; numbers and booleans parsed."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"expected OPTION=VALUE, got {item!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(text.lower(), text)
    return key, value


def parse_config(name: str, options: dict[str, Any] | None = None) -> Config:
    """``static``, ``kr_1x``, ``odconv_4x``, ``kr_4x+anneal``... → :class:`Config`; ``options``:
    further ``kr_convert`` options of the converted configurations."""
    base, anneal = (
        (name[: -len(ANNEAL_SUFFIX)], True) if name.endswith(ANNEAL_SUFFIX) else (name, False)
    )
    if base == "static":
        if anneal:
            raise ValueError("'static+anneal': a static model has no attention temperature")
        return Config(name, None)
    mode, _, kernels = base.partition("_")
    if mode not in MODES or not kernels.endswith("x") or not kernels[:-1].isdigit():
        raise ValueError(
            f"unknown configuration {name!r}: use 'static' or '<mode>_<n>x' with mode in {MODES} "
            f"(e.g. kr_1x, odconv_4x), optionally followed by '{ANNEAL_SUFFIX}'"
        )
    return Config(name, {**(options or {}), "mode": mode, "kernel_num": int(kernels[:-1])}, anneal)


# ----------------------------------------------------------------------------------------- data
@dataclass
class Split:
    """Training and test tensors: images (N, 3, S, S), labels (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    description: str


def digits_split(train_images: int, image_size: int) -> Split:
    """A stratified subset of ``train_images`` digits for training; the other digits for testing."""
    images, labels = digit_images(image_size)
    if not 10 <= train_images < len(labels) - 10:
        raise ValueError(
            f"--train-images must be between 10 and {len(labels) - 11}; got {train_images}"
        )
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), train_size=train_images, stratify=labels.numpy(), random_state=0
    )
    return Split(
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10,
        f"scikit-learn digits at {image_size}x{image_size}: {len(train_idx)} training, "
        f"{len(test_idx)} test images",
    )  # fmt: skip


def folder_split(root: str, per_class: int, classes: int | None, image_size: int) -> Split:
    """``per_class`` training images of each class of an ImageNet-layout folder, and its val images.

    Images are decoded once (resized short side, centre crop to ``image_size``, normalised), so that
    every configuration and seed trains on identical tensors.
    """
    from PIL import Image

    from lightning_kr.data.imagenet import class_folders, eval_transform

    names = class_folders(root)[: classes or None]
    transform = eval_transform(image_size, resize_size=round(image_size * 256 / 224))

    def load(split: str, limit: int | None) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for label, name in enumerate(names):
            files = sorted(p for p in (Path(root) / split / name).iterdir() if p.is_file())
            for path in files[:limit]:
                with Image.open(path) as image:
                    xs.append(transform(image.convert("RGB")))
                ys.append(label)
        if not xs:
            raise FileNotFoundError(
                f"no images under {Path(root) / split} for classes {names[:3]}..."
            )
        return torch.stack(xs), torch.tensor(ys)

    train_x, train_y = load("train", per_class)
    test_x, test_y = load("val", None)
    return Split(
        train_x, train_y, test_x, test_y, len(names),
        f"{root}: {len(names)} classes, {len(train_y)} training, {len(test_y)} val images at "
        f"{image_size}x{image_size}",
    )  # fmt: skip


# ------------------------------------------------------------------------------------- training
def build(arch: str, config: Config, split: Split, seed: int) -> nn.Module:
    """The backbone of ``seed`` (identical for every configuration), converted as ``config`` says."""
    torch.manual_seed(seed)
    image_size = split.train_x.shape[-1]
    model = build_model(arch, num_classes=split.num_classes, image_size=image_size)
    if config.convert is None:
        return model
    torch.manual_seed(seed + 10_000)  # the KR parts' own initialisation, equal across modes
    return kr_convert(model, input_size=image_size, **config.convert)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, descriptors: bool
) -> dict[str, Any]:
    """Test top-1 and loss in eval mode; kernel cluster scores of the last KR layer's attentions."""
    model.eval()
    generator = None
    captured: list[Tensor] = []
    hook = None
    if descriptors and isinstance(model, KRModel):
        generator = _last_generator(model, x[:1])
    if generator is not None:

        def keep(module: nn.Module, args: Any, out: Attentions) -> None:
            parts = [
                getattr(out, kind) for kind in ATTENTION_KINDS if getattr(out, kind) is not None
            ]
            if parts:
                captured.append(
                    torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).float()
                )

        hook = generator.register_forward_hook(keep)
    correct, loss = 0, 0.0
    spreads = AttentionStatistics()
    watching = spreads.watch(model) if kernel_generators(model) else contextlib.nullcontext()
    try:
        with watching:
            for start in range(0, len(y), batch_size):
                logits = model(x[start : start + batch_size])
                logits = logits[0] if isinstance(logits, tuple) else logits
                target = y[start : start + batch_size]
                loss += F.cross_entropy(logits, target, reduction="sum").item()
                correct += (logits.argmax(1) == target).sum().item()
    finally:
        if hook is not None:
            hook.remove()
    result: dict[str, Any] = {"top1": 100.0 * correct / len(y), "loss": loss / len(y)}
    if spreads.sums:
        result["spread"] = spreads.median_spread()
    if captured:
        kernels = torch.cat(captured).numpy()
        result["descriptors"] = kernels
        if kernels.std(axis=0).max() > 0:
            result.update(cluster_scores(kernels, y.numpy()))
    return result


def _last_generator(model: KRModel, example: Tensor) -> nn.Module | None:
    """The kernel generator that runs last in a forward pass (the last KR layer's)."""
    order: list[nn.Module] = []
    generators = [
        m for _, layer in model.kr_layers() for m in layer.modules() if hasattr(m, "heads")
    ]
    hooks = [g.register_forward_hook(lambda m, *_: order.append(m)) for g in generators]
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


@dataclass
class Run:
    """One configuration trained with one seed."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    descriptors: np.ndarray | None = None  # (N test images, E): the last epoch's kernel descriptors


def train(
    model: nn.Module,
    split: Split,
    config: Config,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    descriptors: bool,
) -> Run:
    """SGD (momentum 0.9, weight decay 1e-4), one-cycle to ``lr``; the data order depends on the seed only."""
    steps_per_epoch = len(split.train_y) // batch_size
    total = steps_per_epoch * epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    order = torch.Generator().manual_seed(seed)
    run = Run()
    step = 0
    for _ in range(epochs):
        permutation = torch.randperm(len(split.train_y), generator=order)
        model.train()
        for i in range(steps_per_epoch):
            if config.anneal and isinstance(model, KRModel):
                model.set_temperature(max(1.0, 30.0 - 29.0 * step / max(1, total // 2)))
            idx = permutation[i * batch_size : (i + 1) * batch_size]
            start = time.perf_counter()
            logits = model(split.train_x[idx])
            logits = logits[0] if isinstance(logits, tuple) else logits
            loss = F.cross_entropy(logits, split.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            run.step_seconds.append(time.perf_counter() - start)
            run.losses.append(loss.item())
            step += 1
        result = evaluate(model, split.test_x, split.test_y, 256, descriptors)
        run.descriptors = result.pop("descriptors", None)
        run.epochs.append(result)
        model.train()
    return run


# -------------------------------------------------------------------------------------- report
def summarise(name: str, runs: list[Run]) -> dict[str, Any]:
    """Mean ± sd over seeds of the figures of one configuration."""

    def mean_sd(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    quarter = max(1, len(runs[0].losses) // 4)
    final = [run.epochs[-1] for run in runs]
    summary: dict[str, Any] = {
        "config": name,
        "top1": mean_sd([f["top1"] for f in final]),
        "top1_per_seed": [f["top1"] for f in final],
        "test_loss": mean_sd([f["loss"] for f in final]),
        "loss_first_quarter": mean_sd([statistics.fmean(r.losses[:quarter]) for r in runs]),
        "loss_last_quarter": mean_sd([statistics.fmean(r.losses[-quarter:]) for r in runs]),
        "step_ms": statistics.median(s for r in runs for s in r.step_seconds[1:]) * 1000,
        "curve_loss": np.mean([r.losses for r in runs], axis=0).tolist(),
        "curve_top1": np.mean([[e["top1"] for e in r.epochs] for r in runs], axis=0).tolist(),
    }
    for key in ("spread", "silhouette", "knn_purity"):
        values = [f[key] for f in final if key in f]
        if values:
            summary[key] = mean_sd(values)
    return summary


def _score(summary: dict[str, Any], key: str) -> str:
    return f"{summary[key][0]:.3f} ± {summary[key][1]:.3f}" if key in summary else "—"


def render(summaries: list[dict[str, Any]], title: str) -> Table:
    static = next((s for s in summaries if s["config"] == "static"), None)
    table = Table(title=title)
    for column in ("config", "top-1 % (mean ± sd)", "vs static", "seeds", "train loss first → last ¼",
                   "attention spread", "kernel silhouette", "kernel k-NN purity", "ms / step"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("config", "seeds") else "right")
    for s in summaries:
        top1, sd = s["top1"]
        delta = "" if static is None or s is static else f"{top1 - static['top1'][0]:+.1f}"
        first, last = s["loss_first_quarter"][0], s["loss_last_quarter"][0]

        table.add_row(
            s["config"], f"{top1:.1f} ± {sd:.1f}", delta,
            " ".join(f"{v:.1f}" for v in s["top1_per_seed"]), f"{first:.2f} → {last:.2f}",
            _score(s, "spread"), _score(s, "silhouette"), _score(s, "knn_purity"),
            f"{s['step_ms']:.0f}",
        )  # fmt: skip
    return table


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    window = 5
    for s in summaries:
        curve = np.asarray(s["curve_loss"])
        smooth = (
            np.convolve(curve, np.ones(window) / window, mode="valid")
            if len(curve) > window
            else curve
        )
        ax_loss.plot(np.arange(len(smooth)) + (len(curve) - len(smooth)), smooth, label=s["config"])
        ax_top1.plot(
            np.arange(1, len(s["curve_top1"]) + 1), s["curve_top1"], marker="o", label=s["config"]
        )
    ax_loss.set(
        xlabel="training step", ylabel=f"training loss (mean over seeds, {window}-step mean)"
    )
    ax_top1.set(xlabel="epoch", ylabel="test top-1 % (mean over seeds)")
    ax_loss.legend(fontsize=8)
    ax_top1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kernels(
    runs: dict[str, list[Run]], summaries: list[dict[str, Any]], labels: np.ndarray, path: Path
) -> bool:
    """t-SNE of the first seed's per-image kernel descriptors, one panel per configuration that
    has them, titled with its spread and k-NN purity. Returns whether anything was drawn."""
    panels = []
    for summary in summaries:
        descriptors = runs[summary["config"]][0].descriptors
        if descriptors is None or descriptors.std(axis=0).max() == 0:
            continue
        final = runs[summary["config"]][0].epochs[-1]
        scores = {key: final[key] for key in ("spread", "knn_purity") if key in final}
        panels.append(tsne_panel(summary["config"], descriptors, scores))
    if not panels:
        return False
    plot_embeddings(
        panels, labels, path,
        f"per-image kernels of the last KR layer, {len(labels)} test images, seed 0",
    )  # fmt: skip
    return True


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", default="resnet18", help="torchvision builder, vit_tiny or mobilenet_v2_050"
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05, help="peak of the one-cycle schedule")
    parser.add_argument("--train-images", type=int, default=600, help="digits used for training")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--data-root", default=None, help="ImageNet-layout folder instead of the digits"
    )
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--classes", type=int, default=None, help="first N classes of --data-root")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-descriptors", action="store_true", help="skip kernel cluster scores")
    parser.add_argument(
        "--tsne",
        action="store_true",
        help="also draw <out>/kernels_tsne.png: t-SNE of the per-image kernel descriptors of "
        "each configuration (seed 0), coloured by class",
    )
    parser.add_argument(
        "--kr",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="KRConfig options for every converted configuration, e.g. attention_norm=layer "
        "(the earlier default) or kernel_num=2",
    )
    parser.add_argument("--out", default=None, help="output folder (default runs/compare/<time>)")
    args = parser.parse_args(argv)
    try:
        options = dict(parse_option(item) for item in args.kr)
        KRConfig.with_overrides(None, **options)
    except (TypeError, ValueError) as error:
        parser.error(f"--kr: {error}")
    args.parsed = [parse_config(name, options) for name in args.configs]
    if args.tsne and args.no_descriptors:
        parser.error("--tsne draws the kernel descriptors: drop --no-descriptors")
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    return args


def main(argv: list[str] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if log is None:

        def log(line: str) -> None:
            console.print(line)
            sys.stdout.flush()  # progress shows when the output goes to a file too

    split = (
        folder_split(args.data_root, args.train_per_class, args.classes, args.image_size)
        if args.data_root
        else digits_split(args.train_images, args.image_size)
    )
    if len(split.train_y) < args.batch_size:
        raise ValueError(
            f"--batch-size {args.batch_size} exceeds the {len(split.train_y)} training images"
        )
    out = Path(args.out or Path("runs") / "compare" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Run]] = {c.name: [] for c in args.parsed}
    for seed in range(args.seeds):
        for config in args.parsed:
            model = build(args.arch, config, split, seed)
            run = train(model, split, config, seed, args.epochs, args.batch_size, args.lr,
                        not args.no_descriptors)  # fmt: skip
            runs[config.name].append(run)
            log(f"seed {seed} {config.name:14s} top-1 {run.epochs[-1]['top1']:5.1f}  "
                f"{statistics.median(run.step_seconds) * 1000:.0f} ms/step")  # fmt: skip
    summaries = [summarise(name, seed_runs) for name, seed_runs in runs.items()]
    steps = len(split.train_y) // args.batch_size * args.epochs
    title = (
        f"{args.arch}, {split.description}; {steps} steps of batch {args.batch_size}, SGD one-cycle "
        f"to lr {args.lr}; {args.seeds} seeds; {datetime.now():%Y-%m-%d}"
    )
    console.print(render(summaries, title))
    report = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": "python recipes/compare.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch,
        "data": split.description,
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seeds": args.seeds,
        "kr_options": dict(parse_option(item) for item in args.kr),
        "torch": torch.__version__,
        "results": summaries,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    plot(summaries, out / "learning_curves.png")
    written = [out / "compare.json", out / "learning_curves.png"]
    if args.tsne:
        if plot_kernels(runs, summaries, split.test_y.numpy(), out / "kernels_tsne.png"):
            written.append(out / "kernels_tsne.png")
        else:
            log("--tsne: no configuration generated kernel descriptors (static only?)")
    console.print("written: " + ", ".join(str(path) for path in written))
    return report


if __name__ == "__main__":
    from lightning_kr.cli import exit_on_user_error

    with exit_on_user_error("compare.py"):  # a wrong --data-root: one line, no traceback
        main()
