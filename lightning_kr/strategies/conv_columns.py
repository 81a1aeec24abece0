"""``"conv_columns"``: im2col by an ordinary convolution, then one batched matrix product.

The columns come from a depthwise convolution with fixed one-hot kernels (output channel
``c·T + t`` copies tap ``t`` of input channel ``c``: exactly ``F.unfold``'s layout, for any stride,
padding and dilation), so an exported graph holds a ``Conv`` node and a ``MatMul`` node where the
other portable forms hold an index gather (``"unfold"``) or ``k²`` slices and adds (``"taps"``).
The spatial attention scales whichever is smaller per sample, the kernel (``|W| = C_out·C_in/g·T``
numbers) or the columns (``C_in·T·L``): on large maps the kernel, so the product reads unscaled
columns; on small maps with wide layers the columns, so with one candidate the product's kernel
is the static one, shared by the batch. Several candidates are mixed with one ``(B, n) @ (n, |W|)``
product (:func:`~lightning_kr.strategies.kernels.mix_candidates`).

For: every 2-D geometry (1-D as height-1 maps); what ``torch.export`` (ONNX) takes for per-sample
kernels. Cost: the convolution's ``L·|W|`` (plus mixing with several candidates); measured in
onnxruntime (CPU, one layer, ``recipes/export_benchmark.py`` for whole models) at 0.9–1.9x the
exported static convolution on 28²–56² maps, where the exported shifted sums ran at 2.3–6.9x and
the exported ``F.unfold`` at 3.2–9.2x. Not a contender in eager mode, where ``"grouped"`` and
``"taps"`` are faster. Portable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import (
    ConvAttentions,
    ConvGeometry,
    live_taps,
)
from lightning_kr.strategies.kernels import fold_channel_filter, mix_candidates

ROWS_MAP = 4
"""Output positions (2 × 2) at or below which every candidate runs as one product over the batch's
rows and the outputs are mixed (onnxruntime, one layer at batch 50: 1² maps 0.7x the exported
static convolution against 1.0x for per-sample products, 2² 5.0x against 5.8x; at 4² the
per-sample products win, 2.6x against 5.6x)."""


class ConvColumns(ConvStrategy):
    name = "conv_columns"
    dims = frozenset({2})
    portable = True
    folds_attentions = True

    def cost(self, g: ConvGeometry) -> float | None:
        if g.batch is not None:
            return None
        return g.mixing_cost if g.has_kernel else g.plain_cost

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return conv_columns(
            x, weight, att, bias, g.stride, g.padding, g.dilation, g.groups, g.out_size
        )


def one_hot_columns(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    taps: list[int] | None = None,
) -> Tensor:
    """im2col columns of ``x`` (B, C, H, W) as a depthwise convolution with one-hot kernels.

    Args:
        taps: the taps to keep (indices ``u·kw + v``); ``None``: all.

    Returns:
        (B, C·T, H', W'), ``T`` the taps kept: channel ``c·T + t`` is tap ``t`` of channel ``c``,
        the layout of ``F.unfold`` (exact: every output is one input times 1 plus zeros).
    """
    channels = x.shape[1]
    area = kernel_size[0] * kernel_size[1]
    if area == 1 and all(s == 1 for s in stride) and not any(padding):
        return x
    eye = torch.eye(area, dtype=x.dtype, device=x.device)
    if taps is not None and len(taps) < area:
        eye = eye[taps]
    eye = eye.view(-1, 1, *kernel_size).repeat(channels, 1, 1, 1)
    return F.conv2d(x, eye, None, stride, padding, dilation, channels)


def conv_columns(
    x: Tensor,
    weight: Tensor,
    att: ConvAttentions,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """``y_b = a_f[b] ⊙ conv(a_c[b] ⊙ x_b, K_b) + bias``: one-hot columns, one batched product.

    Each attention goes where it touches the fewest numbers of one sample: the spatial attention
    into the kernel or onto the columns; the channel and filter attentions into a per-sample
    kernel that is built anyway, when the kernel is smaller than the input or output they
    would otherwise scale.

    Args:
        x: (B, C_in, H, W); weight: (n, C_out, C_in / g, kh, kw); att: channel (B, C_in),
        filter (B, C_out), spatial (B, kh·kw), kernel (B, n), each or None (kernel: n = 1);
        bias: (C_out,) or None; padding: (top, left), symmetric; out_hw: (H', W').

    Returns:
        (B, C_out, H', W').
    """
    batch, c_in, height, width = x.shape
    n, c_out, c_in_g, kh, kw = weight.shape
    positions = out_hw[0] * out_hw[1]
    # Taps that only ever read padding are dropped (on maps smaller than the kernel's reach).
    live = live_taps((kh, kw), stride, padding, dilation, (height, width), out_hw)
    taps = len(live)
    if not taps:
        return _padding_only(x, weight, att, bias, out_hw)
    weight = weight.reshape(n, c_out, c_in_g, kh * kw)
    if taps < kh * kw:
        weight = weight[..., live]
        if att.spatial is not None:
            att = att._replace(spatial=att.spatial[:, live])
    kernel_size = c_out * c_in_g * taps
    if positions <= ROWS_MAP:
        return _rows_over_batch_conv(
            x, weight, att, bias, (kh, kw), live, stride, padding, dilation, groups, out_hw
        )
    spatial_on_columns = att.spatial is not None and c_in * taps * positions < kernel_size
    per_sample_kernel = att.kernel is not None or (
        att.spatial is not None and not spatial_on_columns
    )
    channel_in_kernel = per_sample_kernel and kernel_size < c_in * height * width
    filter_in_kernel = per_sample_kernel and kernel_size < c_out * positions
    if att.channel is not None and not channel_in_kernel:
        x = x * att.channel.to(x.dtype)[:, :, None, None]
    cols = one_hot_columns(x, (kh, kw), stride, padding, dilation, live)
    cols = cols.reshape(batch, groups, c_in_g * taps, positions)
    if spatial_on_columns:
        assert att.spatial is not None
        per_tap = att.spatial.to(cols.dtype).view(batch, 1, 1, taps, 1)
        cols = (cols.view(batch, groups, c_in_g, taps, positions) * per_tap).view(cols.shape)
    if per_sample_kernel:
        kernel = mix_candidates(
            weight, att.kernel, None if spatial_on_columns else att.spatial, batch
        )
        kernel = fold_channel_filter(
            kernel,
            att.channel if channel_in_kernel else None,
            att.filter if filter_in_kernel else None,
            groups,
        )
        kernel = kernel.reshape(batch, groups, c_out // groups, c_in_g * taps)
    else:
        kernel = weight[0].reshape(groups, c_out // groups, c_in_g * taps)
    y = torch.matmul(kernel.to(cols.dtype), cols).reshape(batch, c_out, *out_hw)
    if att.filter is not None and not filter_in_kernel:
        y = y * att.filter.to(y.dtype)[:, :, None, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y


def _padding_only(
    x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, out_hw: tuple[int, int]
) -> Tensor:
    """The output where every tap reads only padding: the bias, (B, C_out, H', W'). Still a
    function of the weight and the attentions (with zero gradients), as in the other strategies,
    so that anything hooked on them in backward (the kernel generator's dynamism push) runs
    alike."""
    anchor = weight.sum() * 0
    for attention in att:
        if attention is not None:
            anchor = anchor + attention.sum() * 0
    y = x.new_zeros(x.shape[0], weight.shape[1], *out_hw) + anchor.to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)[None, :, None, None]


def _rows_over_batch_conv(
    x: Tensor,
    weight: Tensor,
    att: ConvAttentions,
    bias: Tensor | None,
    kernel_size: tuple[int, int],
    live: list[int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """All candidates as one product over the batch's rows, outputs mixed: no per-sample kernel."""
    batch = x.shape[0]
    n, c_out, c_in_g, taps = weight.shape
    positions = out_hw[0] * out_hw[1]
    if att.channel is not None:
        x = x * att.channel.to(x.dtype)[:, :, None, None]
    cols = one_hot_columns(x, kernel_size, stride, padding, dilation, live)
    cols = cols.reshape(batch, groups, c_in_g, taps, positions)
    if att.spatial is not None:
        cols = cols * att.spatial.to(cols.dtype).view(batch, 1, 1, taps, 1)
    rows = cols.permute(1, 0, 4, 2, 3).reshape(groups, batch * positions, c_in_g * taps)
    kernels = weight.reshape(n, groups, c_out // groups, c_in_g * taps)
    kernels = kernels.permute(1, 3, 0, 2).reshape(groups, c_in_g * taps, n * (c_out // groups))
    outputs = torch.matmul(rows, kernels.to(rows.dtype))  # (g, B·L, n·C_out/g)
    outputs = outputs.view(groups, batch, positions, n, c_out // groups)
    if att.kernel is not None:
        mix = att.kernel.to(outputs.dtype).view(1, batch, 1, n, 1)
        outputs = (outputs * mix).sum(3)
    else:
        outputs = outputs.view(groups, batch, positions, c_out // groups)
    y = outputs.permute(1, 0, 3, 2).reshape(batch, c_out, *out_hw)
    if att.filter is not None:
        y = y * att.filter.to(y.dtype)[:, :, None, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y
