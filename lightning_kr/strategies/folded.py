"""``"folded"``: ``"grouped"`` with channel and filter attention folded into the kernels.

The full per-sample kernel ``W_b = a_f ⊙ a_c ⊙ a_s ⊙ M_b`` (one tensor ``B × |W|`` instead of two
extra activation tensors) through one ``groups = B·g`` convolution, as an autograd Function that
rebuilds ``W_b`` in backward rather than keeping it (:class:`FoldedGroupedConv`); its plain-operator
twin is ``"reference"``'s computation.

For: 2-D geometries (1-D ones as height-1 maps). Cost: ``"grouped"``'s, and it wins over it where a
kernel is no larger than the activations (:func:`~lightning_kr.strategies.grouped.grouped_cost`).
Not portable: the batch is baked into ``groups``.

Notation: ``M_b = sum_n a_kn[b, n] W_n`` (or ``W_0`` when n = 1) is the mixed kernel of sample ``b``;
``G_b`` the gradient of the per-sample kernel. The Function is differentiable once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kr.strategies import tracing
from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.grouped import grouped_cost
from lightning_kr.strategies.memory import cast, compute_dtype
from lightning_kr.strategies.reference import reference_conv


class Folded(ConvStrategy):
    name = "folded"
    dims = frozenset({2})
    folds_attentions = True

    def cost(self, geometry: ConvGeometry) -> float | None:
        return grouped_cost(geometry, folded=True)

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        if tracing.plain_operators():
            return reference_conv(x, weight, att, bias, g)
        dtype = compute_dtype(x)
        return FoldedGroupedConv.apply(
            x.to(dtype), weight.to(dtype), *cast(dtype, att.channel, att.filter, att.spatial),
            *cast(dtype, att.kernel, bias), g.stride, g.padding, g.dilation, g.groups,
        ).view(x.shape[0], weight.shape[1], *g.out_size)  # fmt: skip


class FoldedGroupedConv(torch.autograd.Function):
    """``y_b = conv(x_b, W_b) + bias`` with ``W_b = a_f ⊙ a_c ⊙ a_s ⊙ M_b`` through one
    ``groups = B·g`` convolution; ``W_b`` is rebuilt in backward rather than kept.

    The attentions act as a row scale ``r_b[o, c] = a_f[b, o] · a_c[b, c]`` (small) times a tap scale
    ``a_s[b, t]``; their gradients are batched matrix-vector products with ``E_b = G_b ⊙ M_b``
    (``G_b``: gradient of ``W_b``), so backward makes few passes over ``B × |W|``.

    Shapes: x (B, C_in, H, W) raw (no attention applied); weight (n, C_out, C_in / g, kh, kw);
    channel_att (B, C_in), filter_att (B, C_out), spatial_att (B, kh·kw), kernel_att (B, n), each or
    None; bias (C_out,) or None; stride, padding (top, left), dilation (2,); groups g
    → y (1, B·C_out, H', W'), the grouped convolution's own output: the caller views it as
    (B, C_out, H', W') (a view returned by a custom Function could not be modified in place by the
    next layer, e.g. ``ReLU(inplace=True)``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight, channel_att, filter_att, spatial_att, kernel_att, bias, stride, padding,
        dilation, groups,
    ):  # fmt: skip
        batch, c_in, height, width = x.shape
        _n, c_out, c_in_g, kh, kw = weight.shape
        mixed = _mixed_kernels(weight, kernel_att, batch).reshape(batch, c_out, c_in_g, kh * kw)
        scale = _kernel_scale(
            _row_scale(channel_att, filter_att, weight, batch, groups), spatial_att
        )
        y = F.conv2d(
            x.reshape(1, batch * c_in, height, width),
            (mixed * scale).reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.repeat(batch),
            stride,
            padding,
            dilation,
            groups * batch,
        )
        ctx.save_for_backward(x, weight, channel_att, filter_att, spatial_att, kernel_att)
        ctx.conv = (stride, padding, dilation, groups, bias is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, channel_att, filter_att, spatial_att, kernel_att = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        need = ctx.needs_input_grad
        batch, c_in, height, width = x.shape
        n, c_out, c_in_g, kh, kw = weight.shape
        taps = kh * kw
        mixed = _mixed_kernels(weight, kernel_att, batch).reshape(batch, c_out, c_in_g, taps)
        row = _row_scale(channel_att, filter_att, weight, batch, groups)  # (B, C_out, C_in/g)
        scale = _kernel_scale(row, spatial_att)
        grad_x, grad_folded, _ = torch.ops.aten.convolution_backward(
            grad_y.reshape(1, batch * c_out, *grad_y.shape[2:]),
            x.reshape(1, batch * c_in, height, width),
            (mixed * scale).reshape(-1, c_in_g, kh, kw),
            None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups * batch,
            [need[0], any(need[1:6]), False],
        )
        grads: list[Tensor | None] = [None] * 11
        if need[0]:
            grads[0] = grad_x.view_as(x)
        if has_bias and need[6]:
            grads[6] = grad_y.reshape(batch, c_out, -1).sum(dim=(0, 2))
        if not any(need[1:6]):
            return tuple(grads)
        grad_folded = grad_folded.view(batch, c_out, c_in_g, taps)
        wants_channel = channel_att is not None and need[2]
        wants_filter = filter_att is not None and need[3]
        wants_spatial = spatial_att is not None and need[4]
        if wants_channel or wants_filter or wants_spatial:
            by_mixed = (grad_folded * mixed).view(batch, c_out * c_in_g, taps)  # E_b
            if wants_spatial:
                grads[4] = torch.bmm(row.reshape(batch, 1, -1), by_mixed).view(batch, taps)
            if wants_channel or wants_filter:
                if spatial_att is None:
                    grad_row = by_mixed.sum(-1)
                else:
                    grad_row = torch.bmm(by_mixed, spatial_att.view(batch, taps, 1))
                grad_row = grad_row.view(batch, c_out, c_in_g)
                if wants_filter:
                    channel = _grouped_channels(channel_att, batch, c_out, c_in_g, groups)
                    grads[3] = grad_row.sum(2) if channel is None else (grad_row * channel).sum(2)
                if wants_channel:
                    per_out = grad_row if filter_att is None else grad_row * filter_att[:, :, None]
                    grads[2] = (
                        per_out.view(batch, groups, c_out // groups, c_in_g)
                        .sum(2)
                        .reshape(batch, c_in)
                    )
        if need[1] or need[5]:
            grad_mixed = (grad_folded * scale).reshape(batch, -1)
            if kernel_att is None:
                if need[1]:
                    grads[1] = grad_mixed.sum(0).view_as(weight)
            else:
                if need[1]:
                    grads[1] = (kernel_att.t() @ grad_mixed).view_as(weight)
                if need[5]:
                    grads[5] = grad_mixed @ weight.reshape(n, -1).t()
        return tuple(grads)


def _mixed_kernels(weight: Tensor, kernel_att: Tensor | None, batch: int) -> Tensor:
    """``M_b``: (B, C_out, C_in / g, kh, kw) (an expanded view of ``W_0`` when n = 1)."""
    n, *shape = weight.shape
    if kernel_att is None:
        return weight[0].expand(batch, *shape)
    return (kernel_att @ weight.reshape(n, -1)).view(batch, *shape)


def _grouped_channels(
    channel_att: Tensor | None, batch: int, c_out: int, c_in_g: int, groups: int
) -> Tensor | None:
    """Channel attention seen by each kernel row: (B, C_in) → (B, C_out, C_in / g)."""
    if channel_att is None:
        return None
    per_group = channel_att.view(batch, groups, 1, c_in_g)
    return per_group.expand(batch, groups, c_out // groups, c_in_g).reshape(batch, c_out, c_in_g)


def _row_scale(
    channel_att: Tensor | None, filter_att: Tensor | None, weight: Tensor, batch: int, groups: int
) -> Tensor:
    """``r_b[o, c] = a_f[b, o] · a_c[b, c]``: (B, C_out, C_in / g) (ones where both are None)."""
    _n, c_out, c_in_g = weight.shape[:3]
    channel = _grouped_channels(channel_att, batch, c_out, c_in_g, groups)
    if filter_att is None:
        return weight.new_ones(batch, c_out, c_in_g) if channel is None else channel
    return (
        filter_att[:, :, None].expand(batch, c_out, c_in_g)
        if channel is None
        else (channel * filter_att[:, :, None])
    )


def _kernel_scale(row: Tensor, spatial_att: Tensor | None) -> Tensor:
    """``r_b ⊗ a_s[b]``: (B, C_out, C_in / g, T), or (B, C_out, C_in / g, 1) without spatial attention."""
    if spatial_att is None:
        return row[..., None]
    return row[..., None] * spatial_att[:, None, None, :]
