"""Are the KR layers dynamic? Statistics of the attentions each layer generates, over many samples.

A dynamic convolution is worth its cost only if different images get different kernels. For every
:class:`~lightning_kr.layers.KernelGenerator` of a model and every attention it generates (``channel``,
``filter``, ``spatial``, ``kernel``), :class:`AttentionStatistics` accumulates, over the samples it
sees (streaming: sums, not the samples):

* ``mean``, ``min``, ``max`` of the attention values (neutral gates are 1, a uniform kernel-number
  attention ``1/n``);
* ``spread``: the across-sample spread, ``std over samples / mean |value|`` per attention entry,
  averaged over the entries — 0 means every sample gets the same kernel (a static layer at a
  higher cost); ODConv's official code trained from scratch gives about 0.25;
* ``saturated``: the fraction of gate values within 1 % of the ends of the gate's range
  (``KernelGenerator.gate_bounds``), where the gate has no gradient; for the kernel-number attention, the fraction
  of samples whose largest weight exceeds 0.99;
* ``entropy``: the kernel-number attention's mean entropy as a fraction of ``log n`` (1 = uniform).

Use :func:`attention_statistics` on a batch or a loader, or the
:class:`~lightning_kr.callbacks.AttentionMonitor` callback in a Trainer.

Example::

    >>> stats = attention_statistics(model, images)          # (B, 3, H, W) or a DataLoader
    >>> stats.median_spread()                                 # one number for the whole model
    >>> stats.rows()                                          # one dict per (layer, attention kind)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, Attentions, KernelGenerator

SATURATION = 0.01
"""A gate counts as saturated within this fraction of its range from either end."""


@dataclass
class _Sums:
    """Running sums of one attention of one layer; ``values`` (B, E) at a time."""

    count: int = 0
    total: Tensor | None = None  # (E,)
    squares: Tensor | None = None  # (E,)
    absolute: Tensor | None = None  # (E,)
    low: float = math.inf
    high: float = -math.inf
    saturated: float = 0.0
    entries: int = 0
    entropy: float = 0.0

    def add(self, values: Tensor, kind: str, bounds: tuple[float, float]) -> None:
        values = values.detach().double().flatten(1)  # sums of squares: no cancellation
        if self.total is None:
            self.total = values.new_zeros(values.shape[1])
            self.squares = values.new_zeros(values.shape[1])
            self.absolute = values.new_zeros(values.shape[1])
        self.count += values.shape[0]
        self.total += values.sum(0)
        self.squares += values.square().sum(0)
        self.absolute += values.abs().sum(0)
        self.low = min(self.low, values.min().item())
        self.high = max(self.high, values.max().item())
        if kind == "kernel":
            self.saturated += (values.max(1).values > 1 - SATURATION).sum().item()
            self.entries += values.shape[0]
            n = values.shape[1]
            entropy = -(values * values.clamp_min(1e-12).log()).sum(1) / math.log(n)
            self.entropy += entropy.sum().item()
        else:
            low, high = bounds
            margin = SATURATION * (high - low)
            saturated = (values < low + margin) | (values > high - margin)
            self.saturated += saturated.sum().item()
            self.entries += values.numel()

    def as_tensor(self) -> Tensor:
        """Every sum in one flat tensor (for one collective call across processes)."""
        head = torch.tensor(
            [self.count, self.low, self.high, self.saturated, self.entries, self.entropy],
            dtype=torch.float64,
        )
        assert self.total is not None and self.squares is not None and self.absolute is not None
        return torch.cat(
            [
                head,
                self.total.double().cpu(),
                self.squares.double().cpu(),
                self.absolute.double().cpu(),
            ]
        )

    @classmethod
    def from_tensors(cls, gathered: Tensor) -> _Sums:
        """Sums of every process from ``gathered`` (P, 6 + 3E) rows of :meth:`as_tensor`."""
        size = (gathered.shape[1] - 6) // 3
        body = gathered[:, 6:].sum(0)
        return cls(
            count=int(gathered[:, 0].sum().item()),
            low=gathered[:, 1].min().item(),
            high=gathered[:, 2].max().item(),
            saturated=gathered[:, 3].sum().item(),
            entries=int(gathered[:, 4].sum().item()),
            entropy=gathered[:, 5].sum().item(),
            total=body[:size],
            squares=body[size : 2 * size],
            absolute=body[2 * size :],
        )

    def row(self) -> dict[str, float]:
        assert self.total is not None and self.squares is not None and self.absolute is not None
        n = max(self.count, 1)
        mean = self.total / n
        variance = (self.squares / n - mean.square()).clamp_min(0)
        if self.count > 1:
            variance = variance * self.count / (self.count - 1)
        spread = variance.sqrt() / (self.absolute / n).clamp_min(1e-8)
        return {
            "samples": self.count,
            "mean": mean.mean().item(),
            "min": self.low,
            "max": self.high,
            "spread": spread.mean().item(),
            "saturated": self.saturated / max(self.entries, 1),
            "entropy": self.entropy / n if self.entropy else math.nan,
        }


@dataclass
class AttentionStatistics:
    """Accumulated attention statistics of every KR layer of a model.

    Attach with :meth:`watch` (a context manager that hooks every kernel generator), run the model on
    samples, then read :meth:`rows` / :meth:`median_spread`. ``sums`` maps ``(layer name, kind)`` to
    its running sums; :meth:`merge_gathered` combines the sums of several processes (DDP).
    """

    sums: dict[tuple[str, str], _Sums] = field(default_factory=dict)

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[AttentionStatistics]:
        generators = kernel_generators(model)
        if not generators:
            raise ValueError(
                f"{type(model).__name__} has no KR layer (no KernelGenerator): convert it with "
                "lightning_kr.kr_convert(model) first"
            )
        handles = [
            generator.register_forward_hook(self._hook(name, generator.gate_bounds))
            for name, generator in generators.items()
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str, bounds: tuple[float, float]):
        def record(_module: nn.Module, _args: Any, out: Attentions) -> None:
            for kind in ATTENTION_KINDS:
                values = getattr(out, kind)
                if values is not None:
                    self.sums.setdefault((name, kind), _Sums()).add(values, kind, bounds)

        return record

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (layer, kind), in execution order: ``layer``, ``kind``, ``samples``,
        ``mean``, ``min``, ``max``, ``spread``, ``saturated``, ``entropy`` (NaN but for ``kernel``)."""
        return [{"layer": name, "kind": kind, **s.row()} for (name, kind), s in self.sums.items()]

    def layer_spreads(self) -> dict[str, float]:
        """Each layer's spread: the mean over its attention kinds."""
        per_layer: dict[str, list[float]] = {}
        for row in self.rows():
            per_layer.setdefault(row["layer"], []).append(row["spread"])
        return {name: statistics.fmean(values) for name, values in per_layer.items()}

    def median_spread(self) -> float:
        """The median layer's spread (0.0 for a model whose generators never ran)."""
        spreads = list(self.layer_spreads().values())
        return statistics.median(spreads) if spreads else 0.0

    def as_tensors(self) -> dict[tuple[str, str], Tensor]:
        return {key: s.as_tensor() for key, s in self.sums.items()}

    @classmethod
    def merge_gathered(cls, gathered: dict[tuple[str, str], Tensor]) -> AttentionStatistics:
        """Statistics from sums gathered over processes: ``(P, ·)`` per key."""
        return cls({key: _Sums.from_tensors(rows) for key, rows in gathered.items()})


def kernel_generators(model: nn.Module) -> dict[str, KernelGenerator]:
    """Every kernel generator of ``model`` in module order, by the name of its KR layer: the name
    ``kr_convert`` gave it (its name in the converted model, as in the conversion report), else
    its qualified name in ``model``."""
    owners = {
        id(module.generator): getattr(module, "kr_name", "") or name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "generator", None), KernelGenerator)
    }
    return {
        owners.get(id(module)) or name.removesuffix(".generator"): module
        for name, module in model.named_modules()
        if isinstance(module, KernelGenerator)
    }


def _inputs(batch: Any) -> Any:
    """The model input of a batch: a tensor as is, the first item of a tuple / list."""
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


@torch.no_grad()
def attention_statistics(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    max_batches: int | None = None,
    train_mode: bool = False,
) -> AttentionStatistics:
    """Run ``model`` on ``data`` and return the statistics of every KR layer's attentions.

    Args:
        model: a model with KR layers (e.g. from :func:`~lightning_kr.kr_convert`).
        data: one batch of inputs (B, ...) or an iterable of batches (tensors, or tuples / lists
            whose first item is the input, as a DataLoader of ``(images, labels)`` yields).
        max_batches: stop after this many batches of an iterable.
        train_mode: run in training mode (default: eval mode, as at test time); the model's mode is
            restored afterwards.
    """
    batches = [data] if isinstance(data, Tensor) else data
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.train(train_mode)
    stats = AttentionStatistics()
    try:
        with stats.watch(model):
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                model(_inputs(batch).to(device))
    finally:
        model.train(was_training)
    if not stats.sums:
        raise ValueError(
            "no attention was recorded: the data was empty, or no KR layer of the model generates "
            "attentions (mode='dyconv' with kernel_num=1 is its static convolution)"
        )
    return stats
