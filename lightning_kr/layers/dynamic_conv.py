"""Convolution and linear maps with per-sample aggregated kernels, computed without the slow designs.

The aggregated kernel of sample ``b`` (ODConv, ``KR_SPEC.md``) is::

    W_b = sum_n a_kn[b, n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ W_n

Channel attention ``a_c`` is applied to the input and filter attention ``a_f`` to the output (the same
result, much cheaper). What remains per sample is ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n``; it is
needed only when there are several candidates or a spatial attention. Then one of three strategies
computes ``conv(x_b, K_b)`` for the whole batch:

* ``"shared"``: ``K_b`` is the same for every sample (n = 1 and no spatial attention): one ordinary
  convolution.
* ``"tap_scaled"``: n = 1 with spatial attention: ``a_s`` scales the im2col columns tap by tap and one
  ordinary matrix product with the static kernel follows (no per-sample kernel at all).
* ``"grouped"``: the per-sample kernels are stacked and run as one ``groups = B·g`` convolution.
* ``"unfold"``: im2col columns and one batched matrix product with the per-sample kernels.

:func:`choose_strategy` picks by shape; every strategy computes the same function (tests assert it
against a naive per-sample reference). ``B × n × |W|`` is never materialised: the candidates are
mixed with one matrix product ``(B, n) @ (n, |W|)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Strategy = Literal["auto", "shared", "tap_scaled", "grouped", "unfold"]
STRATEGIES = ("shared", "tap_scaled", "grouped", "unfold")


def choose_strategy(
    batch: int,
    weight_shape: torch.Size,
    out_hw: tuple[int, int],
    has_kernel_att: bool,
    has_spatial_att: bool,
) -> str:
    """Pick the cheapest exact strategy for one call.

    Args:
        batch: ``B``.
        weight_shape: candidate kernels ``(n, C_out, C_in / g, kh, kw)``.
        out_hw: output spatial size ``(H', W')``.
        has_kernel_att: kernel-number attention present (n > 1).
        has_spatial_att: spatial attention present (k > 1).
    """
    if not has_kernel_att and not has_spatial_att:
        return "shared"
    _, c_out, _c_in_g, _kh, _kw = weight_shape
    positions = out_hw[0] * out_hw[1]
    if not has_kernel_att:
        # n = 1, spatial attention only: scaling im2col columns costs C·k²·L per sample, a per-sample
        # kernel costs C_out·C·k² per sample plus a slow grouped convolution.
        return "tap_scaled" if positions <= 4 * c_out else "grouped"
    # Several candidates: per-sample kernels are unavoidable. Few positions per kernel favour one
    # batched matrix product; many favour the grouped convolution.
    return "unfold" if positions <= c_out else "grouped"


def mix_candidates(
    weight: Tensor, kernel_att: Tensor | None, spatial_att: Tensor | None, batch: int
) -> Tensor:
    """Per-sample kernels ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n``.

    Args:
        weight: candidates (n, C_out, C_in / g, kh, kw).
        kernel_att: (B, n) or ``None`` (n must be 1).
        spatial_att: (B, kh*kw) or ``None``.
        batch: ``B``.

    Returns:
        (B, C_out, C_in / g, kh, kw).
    """
    n, c_out, c_in_g, kh, kw = weight.shape
    if kernel_att is not None:
        kernels = (kernel_att.to(weight.dtype) @ weight.reshape(n, -1)).view(
            batch, c_out, c_in_g, kh, kw
        )
    else:
        kernels = weight[0].expand(batch, c_out, c_in_g, kh, kw)
    if spatial_att is not None:
        kernels = kernels * spatial_att.to(weight.dtype).view(batch, 1, 1, kh, kw)
    return kernels


def conv_output_size(
    size: int, kernel: int, stride: int, padding: tuple[int, int], dilation: int
) -> int:
    return (size + padding[0] + padding[1] - dilation * (kernel - 1) - 1) // stride + 1


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
    strategy: Strategy = "auto",
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
        strategy: one of :data:`STRATEGIES` or ``"auto"``.

    Returns:
        (B, C_out, H', W').
    """
    batch, c_in = x.shape[:2]
    _n, c_out, c_in_g, kh, kw = weight.shape
    if channel_att is not None:
        x = x * channel_att.to(x.dtype)[:, :, None, None]
    top, bottom, left, right = padding
    symmetric = top == bottom and left == right
    if not symmetric:
        x = F.pad(x, (left, right, top, bottom))
        top = bottom = left = right = 0
    height, width = x.shape[-2:]
    out_h = conv_output_size(height, kh, stride[0], (top, bottom), dilation[0])
    out_w = conv_output_size(width, kw, stride[1], (left, right), dilation[1])
    if strategy == "auto":
        strategy = choose_strategy(
            batch, weight.shape, (out_h, out_w), kernel_att is not None, spatial_att is not None
        )
    conv_padding = (top, left)

    if strategy == "shared":
        if kernel_att is not None or spatial_att is not None:
            raise ValueError("strategy 'shared' needs n = 1 and no spatial attention")
        y = F.conv2d(x, weight[0], None, stride, conv_padding, dilation, groups)
    elif strategy == "grouped":
        kernels = mix_candidates(weight, kernel_att, spatial_att, batch)
        y = F.conv2d(
            x.reshape(1, batch * c_in, x.shape[2], x.shape[3]),
            kernels.reshape(batch * c_out, c_in_g, kh, kw),
            None,
            stride,
            conv_padding,
            dilation,
            groups * batch,
        ).view(batch, c_out, out_h, out_w)
    elif strategy in ("unfold", "tap_scaled"):
        cols = F.unfold(x, (kh, kw), dilation, conv_padding, stride)  # (B, C_in·kh·kw, L)
        positions = cols.shape[-1]
        if strategy == "tap_scaled":
            if kernel_att is not None:
                raise ValueError("strategy 'tap_scaled' needs n = 1")
            if spatial_att is not None:
                cols = (
                    cols.view(batch, c_in, kh * kw, positions)
                    * spatial_att.to(cols.dtype)[:, None, :, None]
                ).view(batch, c_in * kh * kw, positions)
            kernel = weight[0].reshape(groups, c_out // groups, c_in_g * kh * kw)
            y = torch.matmul(kernel, cols.view(batch, groups, c_in_g * kh * kw, positions))
        else:
            kernels = mix_candidates(weight, kernel_att, spatial_att, batch)
            y = torch.matmul(
                kernels.reshape(batch, groups, c_out // groups, c_in_g * kh * kw),
                cols.view(batch, groups, c_in_g * kh * kw, positions),
            )
        y = y.view(batch, c_out, out_h, out_w)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {('auto', *STRATEGIES)}")

    if filter_att is not None:
        y = y * filter_att.to(y.dtype)[:, :, None, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y


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
