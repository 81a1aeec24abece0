"""``"unfold"``: im2col columns and one (batched) matrix product with the per-sample kernels.

``y_b = M_b @ (a_s[b] ⊙ unfold(x_b))`` per group, with ``M_b = sum_n a_kn[b, n] W_n`` (or ``W_0``
when n = 1): the spatial attention scales the columns tap by tap, so no per-sample kernel is built
with one candidate. In training it runs as :class:`UnfoldConv`, which keeps only its inputs and the
attentions and rebuilds columns and kernels in backward, a slice of the batch at a time; tracers get
the same computation in plain operators (:func:`unfold_conv`).

For: every 2-D geometry (1-D as height-1 maps). Cost: the convolution plus mixing where there are
several candidates, at full speed for 1×1 kernels (one batched matrix product), for several
candidates on maps of up to 64 positions or strided small maps, and at batch 1 where the columns
are under a quarter of the kernel (scaling them by the spatial attention then touches fewer numbers
than scaling the kernel); 1.5x elsewhere on small maps, 2x on large ones; measured slower than a
grouped convolution with groups. Portable, but onnxruntime runs the exported ``F.unfold`` 3x slower
than ``"conv_columns"``, which ``torch.export`` takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kr.strategies import tracing
from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.kernels import mix_candidates
from lightning_kr.strategies.memory import batch_chunks, cast, compute_dtype

SLOWER = 1.5
"""Slowdown of the per-sample im2col product against the best form on small maps."""
LARGE_MAP_SLOWER = 2
"""Slowdown of the GEMM forms (im2col, taps) against a grouped convolution on large maps."""
EXPORTED_SLOWER = 3
"""Slowdown of the exported ``F.unfold`` in onnxruntime against ``"conv_columns"`` (one layer,
28²–56² maps: 3.2–9.2x the exported static convolution against 0.9–1.9x)."""


def unfold_columns(
    x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
) -> Tensor:
    """:class:`UnfoldConv` (training) or :func:`unfold_conv` (tracers) for one call."""
    if tracing.plain_operators():
        return unfold_conv(
            x, weight, att.kernel, att.spatial, g.stride, g.padding, g.dilation, g.groups,
            g.out_size,
        )  # fmt: skip
    dtype = compute_dtype(x)
    return UnfoldConv.apply(
        x.to(dtype), weight.to(dtype), *cast(dtype, att.kernel, att.spatial), g.stride,
        g.padding, g.dilation, g.groups, g.out_size,
    )  # fmt: skip


class Unfold(ConvStrategy):
    name = "unfold"
    dims = frozenset({2})
    portable = True

    def cost(self, g: ConvGeometry) -> float | None:
        base = g.mixing_cost if g.has_kernel else g.plain_cost
        if g.batch is None:  # torch.export: onnxruntime runs F.unfold's gather slowly
            return base * EXPORTED_SLOWER
        if g.batch == 1:
            if g.has_spatial and 4 * g.column_elements < g.kernel_elements:
                return g.mixing_cost
            return None
        if not g.dense:
            return None
        if g.taps == 1 or (g.has_kernel and g.small_map and (g.tiny_map or not g.unit_stride)):
            return base
        return base * (SLOWER if g.small_map else LARGE_MAP_SLOWER)

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return unfold_columns(x, weight, att, bias, g)


class UnfoldConv(torch.autograd.Function):
    """``y_b = M_b @ (a_s[b] ⊙ unfold(x_b))`` per group: any stride, dilation and groups.

    Shapes: x (B, C_in, H, W) with channel attention applied; weight (n, C_out, C_in / g, kh, kw);
    kernel_att (B, n) or None (n = 1); spatial_att (B, kh·kw) or None; stride, dilation (2,);
    padding (top, left), symmetric; groups g; out_hw (H', W') → y (B, C_out, H', W').
    """

    @staticmethod
    def forward(ctx, x, weight, kernel_att, spatial_att, stride, padding, dilation, groups, out_hw):  # type: ignore[override]
        batch, c_in = x.shape[:2]
        n, c_out, c_in_g, kh, kw = weight.shape
        taps, positions = kh * kw, out_hw[0] * out_hw[1]
        kernels = weight.reshape(n, -1)
        per_sample = c_in * taps * positions + (0 if kernel_att is None else kernels.shape[1])
        # Allocated in the output's shape and returned as is: a view returned by a custom Function
        # could not be modified in place by the next layer (ReLU(inplace=True)).
        y = x.new_empty(batch, c_out, *out_hw)
        y_flat = y.view(batch, c_out, positions)
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            cols = _scaled_columns(
                x[chunk], spatial_att, chunk, (kh, kw), dilation, padding, stride
            )
            count = cols.shape[0]
            cols = cols.view(count, groups, c_in_g * taps, positions)
            if kernel_att is None:
                kernel = kernels.view(groups, c_out // groups, c_in_g * taps)
            else:
                kernel = (kernel_att[chunk] @ kernels).view(
                    count, groups, c_out // groups, c_in_g * taps
                )
            y_flat[chunk] = torch.matmul(kernel, cols).view(count, c_out, positions)
        ctx.save_for_backward(x, weight, kernel_att, spatial_att)
        ctx.conv = (stride, padding, dilation, groups, out_hw)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, kernel_att, spatial_att = ctx.saved_tensors
        stride, padding, dilation, groups, out_hw = ctx.conv
        need_x, need_w, need_kernel, need_spatial = ctx.needs_input_grad[:4]
        batch, c_in, height, width = x.shape
        n, c_out, c_in_g, kh, kw = weight.shape
        taps, positions = kh * kw, out_hw[0] * out_hw[1]
        kernels = weight.reshape(n, -1)
        grad_y = grad_y.reshape(batch, groups, c_out // groups, positions)
        grad_x = torch.empty_like(x) if need_x else None
        grad_k = torch.zeros_like(kernels) if need_w else None
        grad_kernel_att = torch.empty_like(kernel_att) if need_kernel else None
        grad_spatial = torch.empty_like(spatial_att) if need_spatial else None
        per_sample = 2 * c_in * taps * positions + (
            0 if kernel_att is None else 2 * kernels.shape[1]
        )
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            cols = F.unfold(x[chunk], (kh, kw), dilation, padding, stride)  # (c, C_in·T, L)
            count = cols.shape[0]
            g = grad_y[chunk]
            if kernel_att is None:
                kernel = kernels.view(groups, c_out // groups, c_in_g * taps)
            else:
                kernel = (kernel_att[chunk] @ kernels).view(
                    count, groups, c_out // groups, c_in_g * taps
                )
            att = None if spatial_att is None else spatial_att[chunk].view(count, 1, taps, 1)
            if need_x or need_spatial:
                grad_cols = torch.matmul(kernel.transpose(-1, -2), g).view(
                    count, c_in, taps, positions
                )
                if need_spatial:
                    grad_spatial[chunk] = (grad_cols * cols.view(count, c_in, taps, positions)).sum(
                        (1, 3)
                    )
                if need_x:
                    if att is not None:
                        grad_cols.mul_(att)
                    grad_x[chunk] = F.fold(
                        grad_cols.view(count, c_in * taps, positions),
                        (height, width),
                        (kh, kw),
                        dilation,
                        padding,
                        stride,
                    )
            if not (need_w or need_kernel):
                continue
            if att is not None:
                cols.view(count, c_in, taps, positions).mul_(att)
            cols = cols.view(count, groups, c_in_g * taps, positions)
            if kernel_att is None:
                grad_k.view(groups, c_out // groups, c_in_g * taps).add_(
                    torch.einsum("bgol,bgkl->gok", g, cols)
                )
                continue
            grad_mixed = torch.matmul(g, cols.transpose(-1, -2)).view(count, -1)
            if need_w:
                grad_k.addmm_(kernel_att[chunk].t(), grad_mixed)
            if need_kernel:
                grad_kernel_att[chunk] = grad_mixed @ kernels.t()
        grad_weight = grad_k.view_as(weight) if need_w else None
        return grad_x, grad_weight, grad_kernel_att, grad_spatial, None, None, None, None, None


def _scaled_columns(
    x: Tensor,
    spatial_att: Tensor | None,
    chunk: slice,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
) -> Tensor:
    """im2col columns (c, C_in·T, L) of ``x`` (c, C_in, H, W), scaled tap by tap by ``a_s``."""
    cols = F.unfold(x, kernel_size, dilation, padding, stride)
    if spatial_att is not None:
        count, rows, positions = cols.shape
        taps = kernel_size[0] * kernel_size[1]
        cols.view(count, rows // taps, taps, positions).mul_(
            spatial_att[chunk].view(count, 1, taps, 1)
        )
    return cols


def unfold_conv(
    x: Tensor,
    weight: Tensor,
    kernel_att: Tensor | None,
    spatial_att: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """:class:`UnfoldConv` in plain operators (for tracers)."""
    batch, c_in = x.shape[:2]
    _n, c_out, c_in_g, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # (B, C_in·kh·kw, L)
    positions = cols.shape[-1]
    if spatial_att is not None:
        cols = (
            cols.view(batch, c_in, kh * kw, positions)
            * spatial_att.to(cols.dtype)[:, None, :, None]
        )
    cols = cols.reshape(batch, groups, c_in_g * kh * kw, positions)
    if kernel_att is None:
        kernel = weight[0].reshape(groups, c_out // groups, c_in_g * kh * kw)
    else:
        kernel = mix_candidates(weight, kernel_att, None, batch).reshape(
            batch, groups, c_out // groups, c_in_g * kh * kw
        )
    return torch.matmul(kernel.to(cols.dtype), cols).view(batch, c_out, *out_hw)
