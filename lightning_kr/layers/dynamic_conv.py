"""Convolution and linear maps with per-sample aggregated kernels: choose a strategy and call it.

The aggregated kernel of sample ``b`` (ODConv; ``docs/method.md``) is::

    W_b = sum_n a_kn[b, n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ W_n

Channel attention ``a_c`` is applied to the input and filter attention ``a_f`` to the output (the same
result, much cheaper). What remains per sample is ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n``. How
``conv(x_b, K_b)`` is computed for the whole batch is a strategy of :mod:`lightning_kr.strategies`
(one file each: what it applies to, its cost, whether it exports, its computation); ``"auto"``
takes the cheapest that applies. Every strategy computes the same function (tests assert it against
a naive per-sample reference).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies import registry
from lightning_kr.strategies.geometry import (
    PER_SAMPLE_KERNEL_COST,
    SMALL_MAP,
    ConvAttentions,
    ConvGeometry,
    conv_output_size,
    live_taps,
    symmetric_padding,
)
from lightning_kr.strategies.kernels import fold_channel_filter, mix_candidates
from lightning_kr.strategies.memory import memory_format

__all__ = [
    "PER_SAMPLE_KERNEL_COST",
    "SMALL_MAP",
    "STRATEGIES",
    "Strategy",
    "choose_strategy",
    "conv_output_size",
    "dynamic_conv2d",
    "dynamic_linear",
    "fold_channel_filter",
    "live_taps",
    "mix_candidates",
    "portable_strategy",
]

STRATEGIES: tuple[str, ...] = registry.names(2)
"""The strategies of 2-D (and 1-D) layers, from :data:`~lightning_kr.strategies.registry.REGISTRY`."""

Strategy = Literal[("auto", *STRATEGIES)]  # type: ignore[valid-type]
"""``"auto"`` or a name of :data:`STRATEGIES`."""


def dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    *,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    spatial_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    strategy: str = "auto",
) -> Tensor:
    """``y_b = a_f[b] ⊙ conv(a_c[b] ⊙ x_b, K_b) + bias`` for every sample ``b`` at once.

    Args:
        x: input (B, C_in, H, W), already padded for non-zero padding modes.
        weight: candidates (n, C_out, C_in / groups, kh, kw).
        channel_att: (B, C_in) or ``None``.
        filter_att: (B, C_out) or ``None``.
        spatial_att: (B, kh*kw) or ``None``.
        kernel_att: (B, n) or ``None`` (then n must be 1).
        bias: (C_out,) or ``None``.
        stride, dilation: per spatial dimension.
        padding: ``(top, bottom, left, right)`` zero padding.
        groups: convolution groups.
        strategy: one of :data:`STRATEGIES` or ``"auto"`` (under ``torch.export`` every call takes
            the cheapest portable strategy).

    Returns:
        (B, C_out, H', W'), in the input's memory format (as ``F.conv2d``: models that ``.view()``
        a convolution's output rely on it).
    """
    return _dynamic_conv(
        x, weight, ConvAttentions(channel_att, filter_att, spatial_att, kernel_att), bias,
        stride, padding, dilation, groups, strategy,
    )  # fmt: skip


def _dynamic_conv(
    x: Tensor,
    weight: Tensor,
    att: ConvAttentions,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    strategy: str,
) -> Tensor:
    """:func:`dynamic_conv2d` for a kernel of any rank the registry has strategies for."""
    layout = memory_format(x)
    x, conv_padding = symmetric_padding(x, padding)
    geometry = ConvGeometry.of_call(x, weight, att, stride, conv_padding, dilation, groups)
    chosen = registry.select(strategy, geometry)
    return chosen(x, weight, att, bias, geometry).contiguous(memory_format=layout)


def choose_strategy(
    batch: int,
    weight_shape: torch.Size,
    out_hw: tuple[int, int],
    has_kernel_att: bool,
    has_spatial_att: bool,
    stride: tuple[int, int] = (1, 1),
    groups: int = 1,
    in_hw: tuple[int, int] | None = None,
    padding: tuple[int, int] | None = None,
    dilation: tuple[int, int] = (1, 1),
) -> str:
    """The strategy ``"auto"`` runs for one 2-D call: the cheapest that applies
    (:func:`~lightning_kr.strategies.registry.choose`; each strategy's cost is in its file).

    Args:
        batch: ``B``.
        weight_shape: candidate kernels ``(n, C_out, C_in / g, kh, kw)``.
        out_hw: output spatial size ``(H', W')``.
        has_kernel_att: kernel-number attention present (n > 1).
        has_spatial_att: spatial attention present (k > 1).
        stride: convolution stride.
        groups: convolution groups.
        in_hw: input spatial size ``(H, W)`` before padding (default: ``out_hw`` times ``stride``).
        padding: ``(top, left)`` zero padding (symmetric); ``None``: every tap counts as live.
        dilation: convolution dilation.
    """
    attentions = {"kernel": has_kernel_att, "spatial": has_spatial_att}
    geometry = ConvGeometry(
        weight_shape=tuple(weight_shape),
        stride=tuple(stride),
        dilation=tuple(dilation),
        groups=groups,
        attentions=frozenset(k for k, present in attentions.items() if present),
        batch=batch,
        in_size=None if in_hw is None else tuple(in_hw),
        out_size=tuple(out_hw),
        padding=None if padding is None else tuple(padding),
    )
    return registry.choose(geometry).name


def portable_strategy(
    has_kernel_att: bool,
    has_spatial_att: bool,
    stride: tuple[int, int] = (1, 1),
    groups: int = 1,
    kernel_size: tuple[int, int] = (3, 3),
) -> str:
    """The strategy a 2-D call runs under ``torch.export`` (ONNX): the cheapest portable one for
    any batch (``"shared"`` where every sample has the same kernel; ``"taps"`` for stride-1, dense
    k×k kernels; else ``"unfold"``)."""
    attentions = {"kernel": has_kernel_att, "spatial": has_spatial_att}
    geometry = ConvGeometry(
        weight_shape=(2 if has_kernel_att else 1, 1, 1, *kernel_size),
        stride=tuple(stride),
        dilation=(1, 1),
        groups=groups,
        attentions=frozenset(k for k, present in attentions.items() if present),
        out_size=(1, 1),
    )
    return registry.choose(geometry, portable=True).name


def dynamic_linear(
    x: Tensor,
    weight: Tensor,
    *,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """``y_b = a_f[b] ⊙ (K_b (a_c[b] ⊙ x_b)) + bias`` with ``K_b = sum_n a_kn[b, n] W_n``.

    Args:
        x: (B, N, C_in) tokens (N = 1 for plain vectors).
        weight: candidates (n, C_out, C_in).
        channel_att: (B, C_in) or ``None``; filter_att: (B, C_out) or ``None``;
        kernel_att: (B, n) or ``None`` (then n must be 1); bias: (C_out,) or ``None``.

    Returns:
        (B, N, C_out).
    """
    batch, tokens, c_in = x.shape
    n, c_out, _ = weight.shape
    if channel_att is not None:
        x = x * channel_att.to(x.dtype)[:, None, :]
    if kernel_att is None:
        y = F.linear(x, weight[0])
    elif tokens < n:
        # Few tokens: mixing outputs (N·n·|W|) is cheaper than mixing kernels ((n + N)·|W|).
        y_all = F.linear(x, weight.reshape(n * c_out, c_in)).view(batch, tokens, n, c_out)
        y = torch.einsum("btnc,bn->btc", y_all, kernel_att.to(y_all.dtype))
    else:
        kernels = (kernel_att.to(weight.dtype) @ weight.reshape(n, -1)).view(batch, c_out, c_in)
        y = torch.bmm(x, kernels.transpose(1, 2).to(x.dtype))
    if filter_att is not None:
        y = y * filter_att.to(y.dtype)[:, None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
