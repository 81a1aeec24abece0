"""``"taps"``: a k×k convolution as the sum of k² shifted 1×1 convolutions from one matrix product.

One matrix product of the channels-last input with all taps' kernels
``(B·H·W, C_in) @ (C_in, k²·C_out)`` (per sample when n > 1), then the k² shifted partial outputs
are weighted by the spatial attention and summed. Exactly the convolution's multiply-adds, as one
large well-shaped GEMM. In training it runs as :class:`TapsConv`, which keeps only its inputs and
the attentions and recomputes the partial sums in backward, a slice of the batch at a time; tracers
get the same computation in plain operators (:func:`taps_conv`).

For: 2-D convolutions (1-D as height-1 maps) with stride 1 and groups 1. Cost: the convolution
plus mixing where there are several candidates: the fast path for wide layers on small maps (1.6x
the static convolution at 7², 512 channels, where a grouped convolution is 8–14x), 1.2x that with
several candidates on maps of up to 64 positions (it must permute every candidate kernel), 1.5x
for 1×1 kernels (one tap: the im2col product is the same product), 2x on large maps; never at
batch 1 (one sample's grouped convolution is an ordinary one). Portable, but onnxruntime runs
the exported shifted sums 2.5x slower than ``"conv_columns"``, which ``torch.export`` takes.

Not the 3-D ``"tap_products"``, which applies per-sample kernels tap by tap (the 3-D strategy was
called ``"taps"`` before; see :mod:`~lightning_kr.strategies.tap_products`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kr.strategies import kept_layouts, tracing
from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry, tap_offsets, tap_windows
from lightning_kr.strategies.kept_layouts import kept_layout
from lightning_kr.strategies.memory import batch_chunks, cast, channels_last_rows, compute_dtype
from lightning_kr.strategies.unfold import LARGE_MAP_SLOWER, SLOWER

PERMUTES_CANDIDATES = 1.2
"""Slowdown with several candidates on maps of up to 64 positions (see the module)."""
EXPORTED_SLOWER = 2.5
"""Slowdown of the exported shifted sums in onnxruntime against ``"conv_columns"`` (one layer,
28²–56² maps: 2.3–6.9x the exported static convolution against 0.9–1.9x)."""
TINY_EXPORTED = 4
"""Output positions (2 × 2) at or below which the exported shifted sums beat ``"conv_columns"``
with one candidate and every tap live (2² maps, 256 channels, batch 1 / 50: 1.9x / 1.7x the
exported static convolution against 2.3x / 5.0x)."""


class Taps(ConvStrategy):
    name = "taps"
    dims = frozenset({2})
    portable = True

    def applies(self, g: ConvGeometry) -> str | None:
        if not (g.dense and g.unit_stride):
            return "groups = 1 and stride 1"
        return None

    def cost(self, g: ConvGeometry) -> float | None:
        base = g.mixing_cost if g.has_kernel else g.plain_cost
        if g.batch is None:  # torch.export: onnxruntime runs the shifted sums slowly ...
            tiny = not g.has_kernel and g.positions <= TINY_EXPORTED and g.live_taps == g.taps
            return base * (1 if tiny else EXPORTED_SLOWER)  # ... except on the tiniest maps
        if g.batch == 1:
            return None
        if g.taps == 1:
            return base * SLOWER
        if not g.small_map:
            return base * LARGE_MAP_SLOWER
        return base * (PERMUTES_CANDIDATES if g.has_kernel and g.tiny_map else 1)

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return taps_conv(x, weight, att.kernel, att.spatial, g.padding, g.dilation, g.out_size)


def taps_conv(
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
    if not tracing.plain_operators():
        dtype = compute_dtype(x)
        weight = weight.to(dtype)
        kernels = kept_layout(weight, "taps", tap_kernels) if kept_layouts.keeps() else None
        y = TapsConv.apply(
            x.to(dtype), weight, *cast(dtype, kernel_att, spatial_att), padding, dilation,
            out_hw, kernels,
        )  # fmt: skip
        return y.permute(0, 3, 1, 2)
    batch, c_in, height, width = x.shape
    n, c_out, _, kh, kw = weight.shape
    taps = kh * kw
    x_cl = x.permute(0, 2, 3, 1).reshape(batch, height * width, c_in)
    if kernel_att is None:
        kernel = weight[0].permute(1, 2, 3, 0).reshape(c_in, taps * c_out)
        partial = x_cl.reshape(-1, c_in) @ kernel.to(x_cl.dtype)
    else:
        mixed = kernel_att.to(weight.dtype) @ weight.permute(0, 2, 3, 4, 1).reshape(n, -1)
        partial = torch.bmm(x_cl, mixed.view(batch, c_in, taps * c_out).to(x_cl.dtype))
    partial = partial.view(batch, height, width, taps, c_out)
    if spatial_att is None:
        spatial_att = partial.new_ones(batch, taps)
    offsets = tap_offsets((kh, kw), padding, dilation)
    y = shift_sum(partial, spatial_att.to(partial.dtype), offsets, out_hw)
    return y.permute(0, 3, 1, 2)


def tap_kernels(weight: Tensor) -> Tensor:
    """The candidates (n, C_out, C_in, kh, kw) as rows (n, C_in · kh·kw · C_out): for one candidate,
    the right-hand side ``(C_in, taps · C_out)`` of the product with channels-last rows."""
    n, c_out, c_in, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 4, 1).reshape(n, c_in * kh * kw * c_out)


def shift_sum(
    partial: Tensor, att: Tensor, offsets: list[tuple[int, int]], out_hw: tuple[int, int]
) -> Tensor:
    """The shifted, weighted tap sum of :class:`TapsConv` in
    out-of-place operators: partial (B, H, W, T, C), att (B, T) → (B, H', W', C)."""
    batch, height, width, _, _ = partial.shape
    out_h, out_w = out_hw
    y = None
    for t, offset in enumerate(offsets):
        window = tap_windows(offset, (height, width), out_hw)
        if window is None:
            continue
        oi, oj, ii, ij = window
        term = partial[:, ii, ij, t] * att[:, t].view(batch, 1, 1, 1)
        term = F.pad(term, (0, 0, oj.start, out_w - oj.stop, oi.start, out_h - oi.stop))
        y = term if y is None else y + term
    if y is None:
        y = partial.new_zeros(batch, out_h, out_w, partial.shape[-1])
    return y


class TapsConv(torch.autograd.Function):
    """``y[b, i, j] = sum_t a_s[b, t] · (x_b[i + du_t, j + dv_t] @ M_b[:, t])``, stride 1, groups 1.

    Shapes: x (B, C_in, H, W) with channel attention applied; weight (n, C_out, C_in, kh, kw);
    kernel_att (B, n) or None (n = 1); spatial_att (B, kh·kw) or None; padding (top, left), symmetric;
    dilation (dh, dw); out_hw (H', W') → y (B, H', W', C_out), channels last.
    """

    @staticmethod
    def forward(ctx, x, weight, kernel_att, spatial_att, padding, dilation, out_hw, kernels=None):  # type: ignore[override]
        batch, c_in, height, width = x.shape
        _, c_out, _, kh, kw = weight.shape
        taps = kh * kw
        offsets = tap_offsets((kh, kw), padding, dilation)
        if kernels is None:  # else kept from an earlier inference call (kept_layouts)
            kernels = tap_kernels(weight)  # (n, c_in · t · c_out)
        per_sample = height * width * taps * c_out + (0 if kernel_att is None else kernels.shape[1])
        y = x.new_zeros(batch, *out_hw, c_out)
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            rows = channels_last_rows(x[chunk])
            count = rows.shape[0]
            if kernel_att is None:
                partial = rows.reshape(-1, c_in) @ kernels.view(c_in, taps * c_out)
            else:
                mixed = (kernel_att[chunk] @ kernels).view(count, c_in, taps * c_out)
                partial = torch.bmm(rows, mixed)
            partial = partial.view(count, height, width, taps, c_out)
            att = None if spatial_att is None else spatial_att[chunk]
            out = y[chunk]
            for t, offset in enumerate(offsets):
                window = tap_windows(offset, (height, width), out_hw)
                if window is None:
                    continue
                oi, oj, ii, ij = window
                if att is None:
                    out[:, oi, oj].add_(partial[:, ii, ij, t])
                else:
                    out[:, oi, oj].addcmul_(partial[:, ii, ij, t], att[:, t].view(count, 1, 1, 1))
        ctx.save_for_backward(x, weight, kernel_att, spatial_att)
        ctx.offsets, ctx.out_hw = offsets, out_hw
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, kernel_att, spatial_att = ctx.saved_tensors
        need_x, need_w, need_kernel, need_spatial = ctx.needs_input_grad[:4]
        batch, c_in, height, width = x.shape
        n, c_out, _, kh, kw = weight.shape
        taps = kh * kw
        kernels = tap_kernels(weight)
        grad_x = x.new_empty(batch, height, width, c_in) if need_x else None
        grad_k = torch.zeros_like(kernels) if need_w and kernel_att is not None else None
        grad_tap = x.new_zeros(taps, c_out, c_in) if need_w and kernel_att is None else None
        grad_kernel_att = torch.empty_like(kernel_att) if need_kernel else None
        grad_spatial = torch.empty_like(spatial_att) if need_spatial else None
        if kernel_att is None:  # per-tap input gradients (T, c·H·W, C_in)
            per_sample = height * width * taps * (c_out + c_in)
        else:  # the mixed kernels and their gradients
            per_sample = height * width * taps * c_out + 2 * kernels.shape[1]
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            rows = channels_last_rows(x[chunk])
            count = rows.shape[0]
            # Adjoint of the shifted sum (before the spatial weights): (c, H, W, T, C_out).
            shifted = grad_y.new_zeros(count, height, width, taps, c_out)
            g = grad_y[chunk]
            for t, offset in enumerate(ctx.offsets):
                window = tap_windows(offset, (height, width), ctx.out_hw)
                if window is not None:
                    oi, oj, ii, ij = window
                    shifted[:, ii, ij, t] = g[:, oi, oj]
            att = None if spatial_att is None else spatial_att[chunk]
            if kernel_att is None:
                by_tap = shifted.view(count * height * width, taps, c_out).transpose(0, 1)
                kernel = kernels.view(c_in, taps, c_out)
                if need_x or need_spatial:
                    grad_rows_by_tap = torch.bmm(by_tap, kernel.permute(1, 2, 0)).view(
                        taps, count, height * width, c_in
                    )
                    # (c, T, H·W·C_in) views of the per-tap input gradients: no copies.
                    per_sample = grad_rows_by_tap.view(taps, count, -1).transpose(0, 1)
                    if need_spatial:
                        grad_spatial[chunk] = torch.bmm(
                            per_sample, rows.reshape(count, -1, 1)
                        ).view(count, taps)
                    if need_x:
                        grad_rows = (
                            grad_rows_by_tap.sum(0)
                            if att is None
                            else torch.bmm(att.view(count, 1, taps), per_sample)
                        )
                        grad_x[chunk] = grad_rows.view(count, height, width, c_in)
                if need_w:
                    if att is not None:
                        shifted.mul_(att.view(count, 1, 1, taps, 1))
                    # (T, C_out, C_in): the kernel's own layout but for the tap axis.
                    grad_tap.add_(torch.matmul(by_tap.transpose(1, 2), rows.reshape(-1, c_in)))
                continue
            mixed = (kernel_att[chunk] @ kernels).view(count, c_in, taps * c_out)
            grad_mixed = torch.bmm(rows.transpose(1, 2), shifted.view(count, -1, taps * c_out))
            if att is not None:
                by_tap = grad_mixed.view(count, c_in, taps, c_out)
                if need_spatial:
                    grad_spatial[chunk] = (by_tap * mixed.view(count, c_in, taps, c_out)).sum(
                        (1, 3)
                    )
                by_tap.mul_(att.view(count, 1, taps, 1))
                shifted.mul_(att.view(count, 1, 1, taps, 1))
            grad_mixed = grad_mixed.view(count, -1)
            if need_w:
                grad_k.addmm_(kernel_att[chunk].t(), grad_mixed)
            if need_kernel:
                grad_kernel_att[chunk] = grad_mixed @ kernels.t()
            if need_x:
                grad_rows = torch.bmm(shifted.view(count, -1, taps * c_out), mixed.transpose(1, 2))
                grad_x[chunk] = grad_rows.view(count, height, width, c_in)
        grad_weight = None
        if grad_tap is not None:
            grad_weight = grad_tap.permute(1, 2, 0).reshape(1, c_out, c_in, kh, kw)
        elif grad_k is not None:
            grad_weight = grad_k.view(n, c_in, kh, kw, c_out).permute(0, 4, 1, 2, 3).contiguous()
        if grad_x is not None:
            grad_x = grad_x.permute(0, 3, 1, 2)
        return grad_x, grad_weight, grad_kernel_att, grad_spatial, None, None, None, None
