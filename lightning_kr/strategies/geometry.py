"""One record of a per-sample convolution: what every strategy's applicability and cost read.

:class:`ConvGeometry` holds the batch, the candidates' shape, the sizes, stride, padding, dilation,
groups and which attentions are present. A call (:meth:`ConvGeometry.of_call`) knows everything; a
layer before its first call (:meth:`ConvGeometry.of_layer`, used to check a forced strategy at
conversion) knows no batch and no sizes, which is all applicability needs. Under ``torch.export``
the batch is left out too (``batch=None``): the exported graph serves every batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies import tracing

PER_SAMPLE_KERNEL_COST = 40
"""What writing and re-reading one element of a per-sample kernel costs, in multiply-adds of a
well-shaped matrix product, measured on CPU (``python recipes/layer_benchmark.py --scale 7 --batch
50``: ResNet-18's layers at a 32² input). The mixing product ``(B, n) @ (n, |W|)`` has an inner
dimension of ``n`` and runs at memory speed, and so does the per-sample product that reads
``B × |W|`` back when a map has few positions. It sets where ``"candidate_outputs"`` (``n·L·|W|``
multiply-adds in one large product) beats mixing the kernels
(``(n + L + 2·PER_SAMPLE_KERNEL_COST)·|W|``): at n = 4, maps of up to about 28 positions."""

SMALL_MAP = 256
"""Output positions (16 × 16) at or below which a ``groups = B`` convolution loses to a GEMM."""

TINY_MAP = 64
"""Output positions (8 × 8) at or below which a map is short enough for the per-sample products
to lose to one product over the batch, or to win over permuting every candidate (see the strategies'
costs)."""


class ConvAttentions(NamedTuple):
    """The per-sample attentions of one call, each ``None`` where absent.

    Shapes: ``channel`` (B, C_in), ``filter`` (B, C_out), ``spatial`` (B, prod(k)), ``kernel``
    (B, n) (``None``: n = 1).
    """

    channel: Tensor | None = None
    filter: Tensor | None = None
    spatial: Tensor | None = None
    kernel: Tensor | None = None


@dataclass(frozen=True)
class ConvGeometry:
    """The shape of one per-sample convolution (or of a layer, before any call).

    Attributes:
        weight_shape: candidates ``(n, C_out, C_in / g, *k)``.
        stride, dilation: per spatial dimension.
        groups: convolution groups.
        attentions: the attentions present, a subset of ``("channel", "filter", "spatial",
            "kernel")``.
        batch: ``B``; ``None`` for any batch (a layer before its first call, or ``torch.export``).
        in_size: input size per spatial dimension after any asymmetric padding; ``None`` when not
            known (a layer).
        out_size: output size per spatial dimension; ``None`` when not known.
        padding: symmetric zero padding per spatial dimension; ``None``: every tap counts as live.
    """

    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    attentions: frozenset[str]
    batch: int | None = None
    in_size: tuple[int, ...] | None = None
    out_size: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None

    @classmethod
    def of_call(
        cls,
        x: Tensor,
        weight: Tensor,
        att: ConvAttentions,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> ConvGeometry:
        """The geometry of ``conv(x, weight)`` with symmetric zero ``padding`` per dimension."""
        # Python ints, so that costs compare exactly under the TorchScript tracer (whose sizes are
        # tensors); the batch stays symbolic under torch.export, whose graph serves every batch.
        in_size = tuple(int(s) for s in x.shape[2:])
        batch = x.shape[0] if tracing.exporting() else int(x.shape[0])
        weight_shape = tuple(int(s) for s in weight.shape)
        return cls(
            weight_shape=weight_shape,
            stride=tuple(stride),
            dilation=tuple(dilation),
            groups=groups,
            attentions=frozenset(k for k, v in att._asdict().items() if v is not None),
            batch=batch,
            in_size=in_size,
            out_size=tuple(
                conv_output_size(size, k, s, (p, p), d)
                for size, k, s, p, d in zip(
                    in_size, weight_shape[3:], stride, padding, dilation, strict=True
                )
            ),
            padding=tuple(padding),
        )

    def any_batch(self) -> ConvGeometry:
        """The same geometry for any batch (what ``torch.export`` records)."""
        return replace(self, batch=None)

    # What the record implies.

    @property
    def dims(self) -> int:
        return len(self.weight_shape) - 3

    @property
    def kernel_num(self) -> int:
        return self.weight_shape[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[3:])

    @property
    def taps(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def has_kernel(self) -> bool:
        return "kernel" in self.attentions

    @property
    def has_spatial(self) -> bool:
        return "spatial" in self.attentions

    @property
    def per_sample_kernel(self) -> bool:
        """Samples have different kernels (several candidates or a spatial attention)."""
        return self.has_kernel or self.has_spatial

    @property
    def dense(self) -> bool:
        return self.groups == 1

    @property
    def unit_stride(self) -> bool:
        return all(s == 1 for s in self.stride)

    @property
    def positions(self) -> int:
        """``L``, the output positions."""
        return math.prod(self.out_size)

    @property
    def padded_in_size(self) -> tuple[int, ...]:
        """Input size before symmetric padding (default: ``out_size`` times ``stride``)."""
        return self.in_size or tuple(o * s for o, s in zip(self.out_size, self.stride, strict=True))

    @property
    def live_taps(self) -> int:
        """Taps that read the input at some output position (all when padding is unknown)."""
        if self.padding is None:
            return self.taps
        return len(
            live_taps(
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.padded_in_size,
                self.out_size,
            )
        )

    # Counted work per sample, in multiply-adds (see each strategy's ``cost``).

    @property
    def pair_elements(self) -> int:
        """``C_out · C_in / g``: one tap of the kernel."""
        return self.weight_shape[1] * self.weight_shape[2]

    @property
    def kernel_elements(self) -> int:
        """``|W|`` of one candidate."""
        return self.pair_elements * self.taps

    @property
    def plain_cost(self) -> int:
        """``L·|W|``: the convolution with one kernel."""
        return self.positions * self.kernel_elements

    @property
    def mixing_cost(self) -> int:
        """``(n + L + 2·PER_SAMPLE_KERNEL_COST)·|W|``: mix the candidates into per-sample kernels
        (``n·|W|``), write and read them back, and convolve (``L·|W|``)."""
        return (
            self.kernel_num + self.positions + 2 * PER_SAMPLE_KERNEL_COST
        ) * self.kernel_elements

    @property
    def column_elements(self) -> int:
        """Numbers in the im2col columns of one sample: ``C_in · prod(k) · L``."""
        return self.weight_shape[2] * self.groups * self.taps * self.positions

    @property
    def activation_elements(self) -> int:
        """Numbers in one sample's input and output (where channel and filter attention apply)."""
        return (
            self.weight_shape[2] * self.groups * math.prod(self.padded_in_size)
            + self.weight_shape[1] * self.positions
        )

    @property
    def small_map(self) -> bool:
        return self.positions <= SMALL_MAP

    @property
    def tiny_map(self) -> bool:
        return self.positions <= TINY_MAP


def conv_output_size(
    size: int, kernel: int, stride: int, padding: tuple[int, int], dilation: int
) -> int:
    return (size + padding[0] + padding[1] - dilation * (kernel - 1) - 1) // stride + 1


def symmetric_padding(x: Tensor, padding: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` and the symmetric padding per dimension a convolution takes, for zero ``padding``
    ``(before_0, after_0, before_1, after_1, …)``; asymmetric padding (``'same'`` with an even
    kernel) is applied to ``x`` with zeros instead."""
    pairs = [padding[i : i + 2] for i in range(0, len(padding), 2)]
    if all(before == after for before, after in pairs):
        return x, tuple(before for before, _ in pairs)
    return F.pad(x, [p for pair in reversed(pairs) for p in pair]), (0,) * len(pairs)


def tap_offsets(
    kernel_size: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> list[tuple[int, int]]:
    """Input offset ``(du, dv)`` of each tap: output (i, j) reads input (i + du, j + dv)."""
    kh, kw = kernel_size
    return [
        (u * dilation[0] - padding[0], v * dilation[1] - padding[1])
        for u in range(kh)
        for v in range(kw)
    ]


def tap_windows(
    offset: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[slice, slice, slice, slice] | None:
    """Output rows/cols of one tap and the input rows/cols they read; ``None`` when the tap never
    lands inside the input."""
    (du, dv), (height, width), (out_h, out_w) = offset, in_hw, out_hw
    i0, i1 = max(0, -du), min(out_h, height - du)
    j0, j1 = max(0, -dv), min(out_w, width - dv)
    if i0 >= i1 or j0 >= j1:
        return None
    return slice(i0, i1), slice(j0, j1), slice(i0 + du, i1 + du), slice(j0 + dv, j1 + dv)


def live_taps(
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    in_hw: tuple[int, ...],
    out_hw: tuple[int, ...],
) -> list[int]:
    """Indices ``u·kw + v`` of the taps that read the input at some output position (on a map
    smaller than the kernel's reach, the others only ever read zero padding)."""

    def live(k: int, s: int, p: int, d: int, size: int, out: int) -> list[int]:
        return [u for u in range(k) if any(0 <= i * s + u * d - p < size for i in range(out))]

    rows = live(kernel_size[0], stride[0], padding[0], dilation[0], in_hw[0], out_hw[0])
    cols = live(kernel_size[1], stride[1], padding[1], dilation[1], in_hw[1], out_hw[1])
    return [u * kernel_size[1] + v for u in rows for v in cols]
