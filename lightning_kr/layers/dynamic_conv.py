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
* ``"grouped"``: the per-sample kernels are stacked and run as one ``groups = B·g`` convolution;
  where a kernel is smaller than the activations, channel and filter attention are folded into it.
* ``"unfold"``: im2col columns and one batched matrix product with the per-sample kernels.
* ``"taps"``: a k×k convolution is the sum of k² shifted 1×1 convolutions. One matrix product of the
  channels-last input with all taps' kernels ``(B·H·W, C_in) @ (C_in, k²·C_out)`` (per sample when
  n > 1), then the k² shifted partial outputs are weighted by the spatial attention and summed.
  Exactly the convolution's multiply-adds, as one large well-shaped GEMM: the fast path for wide
  layers on small feature maps, where a grouped convolution is slowest (stride 1, groups 1).
* ``"reference"``: the textbook method (ODConv's code): the full per-sample kernel
  ``W_b`` (all four attentions folded in) through one ``groups = B`` convolution, for every layer:
  the benchmark's baseline. ``"auto"`` uses it only where ``"grouped"`` folds.

:func:`choose_strategy` picks by shape; every strategy computes the same function (tests assert it
against a naive per-sample reference). ``B × n × |W|`` is never materialised: the candidates are
mixed with one matrix product ``(B, n) @ (n, |W|)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Strategy = Literal["auto", "shared", "tap_scaled", "grouped", "unfold", "taps", "reference"]
STRATEGIES = ("shared", "tap_scaled", "grouped", "unfold", "taps", "reference")


SMALL_MAP = 256  # output positions (16 × 16) below which a grouped convolution loses to a GEMM


def choose_strategy(
    batch: int,
    weight_shape: torch.Size,
    out_hw: tuple[int, int],
    has_kernel_att: bool,
    has_spatial_att: bool,
    stride: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> str:
    """Pick the fastest exact strategy for one call.

    Measured on CPU (``python recipes/layer_benchmark.py``, ResNet-18 shapes, batch 32): a grouped
    convolution with ``groups = B`` runs close to the static convolution on large feature maps
    (1.2x at 56², 64 channels) but 8–14x slower on small ones (7², 512 channels), where one GEMM over
    the taps costs 1.6x; 1×1 kernels are cheapest as one batched matrix product.

    Args:
        batch: ``B``.
        weight_shape: candidate kernels ``(n, C_out, C_in / g, kh, kw)``.
        out_hw: output spatial size ``(H', W')``.
        has_kernel_att: kernel-number attention present (n > 1).
        has_spatial_att: spatial attention present (k > 1).
        stride: convolution stride.
        groups: convolution groups.
    """
    if not has_kernel_att and not has_spatial_att:
        return "shared"
    if batch == 1:
        return "grouped"  # one sample: an ordinary convolution with its aggregated kernel
    kh, kw = weight_shape[-2:]
    small = out_hw[0] * out_hw[1] <= SMALL_MAP
    if kh * kw == 1:
        return "unfold" if groups == 1 else "grouped"
    if not small or groups != 1:
        return "grouped"
    if stride == (1, 1):
        return "taps"
    return "unfold" if has_kernel_att else "tap_scaled"


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
            batch,
            weight.shape,
            (out_h, out_w),
            kernel_att is not None,
            spatial_att is not None,
            stride,
            groups,
        )
    conv_padding = (top, left)
    if (
        strategy == "grouped"
        and c_out * c_in_g * kh * kw <= c_in * height * width + c_out * out_h * out_w
    ):
        # The per-sample kernel is smaller than the activations: fold channel and filter attention
        # into it rather than into two extra activation tensors (less time, less saved memory).
        strategy = "reference"
    if channel_att is not None and strategy != "reference":
        x = x * channel_att.to(x.dtype)[:, :, None, None]

    if strategy == "taps":
        if groups != 1 or stride != (1, 1):
            raise ValueError("strategy 'taps' needs groups = 1 and stride 1")
        y = _taps_conv(x, weight, kernel_att, spatial_att, (top, left), dilation, (out_h, out_w))
    elif strategy == "reference":
        return _reference_conv(
            x, weight, channel_att, filter_att, spatial_att, kernel_att, bias, stride,
            conv_padding, dilation, groups, (out_h, out_w),
        )  # fmt: skip
    elif strategy == "shared":
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


def _taps_conv(
    x: Tensor,
    weight: Tensor,
    kernel_att: Tensor | None,
    spatial_att: Tensor | None,
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> Tensor:
    """Stride-1, groups-1 convolution as k² shifted 1×1 convolutions from one matrix product.

    Args:
        x: (B, C_in, H, W); weight: (n, C_out, C_in, kh, kw); kernel_att: (B, n) or None;
        spatial_att: (B, kh*kw) or None; padding: (top, left) zero padding (symmetric);
        dilation: (dh, dw); out_hw: (H', W').

    Returns:
        (B, C_out, H', W').
    """
    batch, c_in, height, width = x.shape
    n, c_out, _, kh, kw = weight.shape
    taps = kh * kw
    x_cl = x.permute(0, 2, 3, 1).reshape(batch, height * width, c_in)
    if kernel_att is None:
        # (C_in, taps · C_out): one GEMM for the whole batch.
        kernel = weight[0].permute(1, 2, 3, 0).reshape(c_in, taps * c_out)
        partial = (x_cl.reshape(-1, c_in) @ kernel.to(x_cl.dtype)).view(
            batch, height, width, taps, c_out
        )
    else:
        mixed = kernel_att.to(weight.dtype) @ weight.permute(0, 2, 3, 4, 1).reshape(n, -1)
        partial = torch.bmm(x_cl, mixed.view(batch, c_in, taps * c_out).to(x_cl.dtype)).view(
            batch, height, width, taps, c_out
        )
    offsets = [
        (u * dilation[0] - padding[0], v * dilation[1] - padding[1])
        for u in range(kh)
        for v in range(kw)
    ]
    if spatial_att is None:
        spatial_att = partial.new_ones(batch, taps)
    if (
        torch.jit.is_tracing()
    ):  # tracers (fvcore, TorchScript export) cannot record custom Functions
        y = _shift_sum_traceable(partial, spatial_att.to(partial.dtype), offsets, out_hw)
    else:
        y = ShiftSum.apply(partial, spatial_att.to(partial.dtype), offsets, out_hw)
    return y.permute(0, 3, 1, 2)


def _tap_windows(
    offset: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[slice, slice, slice, slice] | None:
    """Output rows/cols and the input rows/cols they read for one tap: output (i, j) reads input
    (i + du, j + dv); ``None`` when the tap never lands inside the input."""
    (du, dv), (height, width), (out_h, out_w) = offset, in_hw, out_hw
    i0, i1 = max(0, -du), min(out_h, height - du)
    j0, j1 = max(0, -dv), min(out_w, width - dv)
    if i0 >= i1 or j0 >= j1:
        return None
    return slice(i0, i1), slice(j0, j1), slice(i0 + du, i1 + du), slice(j0 + dv, j1 + dv)


class ShiftSum(torch.autograd.Function):
    """``y[b, i, j] = sum_t a[b, t] · partial[b, i + du_t, j + dv_t, t]`` (zero outside the input).

    Shapes: partial (B, H, W, T, C), a (B, T) → y (B, H', W', C). A hand-written backward: autograd
    through nine in-place slice updates would zero-fill a partial-sized gradient per tap.
    """

    @staticmethod
    def forward(ctx, partial, att, offsets, out_hw):  # type: ignore[override]
        batch, height, width, _, channels = partial.shape
        y = partial.new_zeros(batch, *out_hw, channels)
        for t, offset in enumerate(offsets):
            window = _tap_windows(offset, (height, width), out_hw)
            if window is None:
                continue
            oi, oj, ii, ij = window
            y[:, oi, oj].addcmul_(partial[:, ii, ij, t], att[:, t].view(batch, 1, 1, 1))
        ctx.save_for_backward(partial, att)
        ctx.offsets, ctx.out_hw = offsets, out_hw
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        partial, att = ctx.saved_tensors
        batch, height, width, taps, _ = partial.shape
        grad_partial = grad_att = None
        if ctx.needs_input_grad[0]:
            grad_partial = partial.new_zeros(partial.shape)
        if ctx.needs_input_grad[1]:
            grad_att = att.new_zeros(batch, taps)
        for t, offset in enumerate(ctx.offsets):
            window = _tap_windows(offset, (height, width), ctx.out_hw)
            if window is None:
                continue
            oi, oj, ii, ij = window
            g = grad_y[:, oi, oj]
            if grad_partial is not None:
                torch.mul(g, att[:, t].view(batch, 1, 1, 1), out=grad_partial[:, ii, ij, t])
            if grad_att is not None:
                grad_att[:, t] = (g * partial[:, ii, ij, t]).sum(dim=(1, 2, 3))
        return grad_partial, grad_att, None, None


def _shift_sum_traceable(
    partial: Tensor, att: Tensor, offsets: list[tuple[int, int]], out_hw: tuple[int, int]
) -> Tensor:
    """:class:`ShiftSum` with out-of-place operations only (same shapes and result)."""
    batch, height, width, _, _ = partial.shape
    out_h, out_w = out_hw
    y = None
    for t, offset in enumerate(offsets):
        window = _tap_windows(offset, (height, width), out_hw)
        if window is None:
            continue
        oi, oj, ii, ij = window
        term = partial[:, ii, ij, t] * att[:, t].view(batch, 1, 1, 1)
        term = F.pad(term, (0, 0, oj.start, out_w - oj.stop, oi.start, out_h - oi.stop))
        y = term if y is None else y + term
    if y is None:
        y = partial.new_zeros(batch, out_h, out_w, partial.shape[-1])
    return y


def _reference_conv(
    x: Tensor,
    weight: Tensor,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    spatial_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """The textbook method: full per-sample kernels ``W_b`` and one ``groups = B·g`` convolution.

    Shapes as :func:`dynamic_conv2d`; ``x`` is the raw input (channel attention not yet applied).
    """
    batch, c_in = x.shape[:2]
    _n, c_out, c_in_g, kh, kw = weight.shape
    kernels = mix_candidates(weight, kernel_att, spatial_att, batch)
    if channel_att is not None:
        per_group = channel_att.view(batch, groups, 1, c_in_g)
        kernels = (
            kernels.reshape(batch, groups, c_out // groups, c_in_g, kh * kw)
            * per_group[..., None].to(kernels.dtype)
        ).view(batch, c_out, c_in_g, kh, kw)
    if filter_att is not None:
        kernels = kernels * filter_att.to(kernels.dtype).view(batch, c_out, 1, 1, 1)
    y = F.conv2d(
        x.reshape(1, batch * c_in, x.shape[2], x.shape[3]),
        kernels.reshape(batch * c_out, c_in_g, kh, kw),
        None if bias is None else bias.repeat(batch),
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return y.view(batch, c_out, *out_hw)


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
