"""``"candidate_outputs"``: convolve with all ``n`` candidates at once and mix the outputs.

No per-sample kernel at all: the im2col rows of the whole batch times all ``n`` candidates in one
matrix product ``(B·L, C_in·k²) @ (C_in·k², n·C_out)``, the spatial attention on the columns, then
the outputs mixed by ``a_kn``. Taps that only read padding are dropped.

For: every 2-D geometry (1-D as height-1 maps). Cost, for dense convolutions with a per-sample
kernel: ``n·L·|W_live|`` multiply-adds (``|W_live|``: the kernel without the taps that only read
padding) against ``(n + L + 2·PER_SAMPLE_KERNEL_COST)·|W|`` to mix per-sample kernels: the cheapest
form on maps with few positions (CIFAR-sized inputs: ResNet-18's last stages run on 2×2 and 1×1
maps, 3–40x faster). With one candidate it does the per-sample im2col product's work in one product
over the batch: a contender where taps drop out and for strided convolutions on maps of up to 64
positions (that product re-reads the kernel for every sample and has only ``L`` columns). Not
measured with groups. Plain operators, but not checked under ``torch.export``: not portable.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies import tracing
from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry, live_taps
from lightning_kr.strategies.kept_layouts import kept_layout


class CandidateOutputs(ConvStrategy):
    name = "candidate_outputs"
    dims = frozenset({2})

    def cost(self, g: ConvGeometry) -> float | None:
        if not (g.per_sample_kernel and g.dense):
            return None
        live = g.live_taps
        if g.has_kernel:
            return g.kernel_num * g.positions * live * g.pair_elements
        if live < g.taps or (not g.unit_stride and g.tiny_map):
            return g.positions * live * g.pair_elements
        return None

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return candidate_outputs_conv(
            x, weight, att.kernel, att.spatial, g.stride, g.padding, g.dilation, g.groups,
            g.out_size,
        )  # fmt: skip


def tap_columns(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    taps: list[int],
) -> Tensor:
    """The im2col columns of the taps ``taps`` only (indices ``u·kw + v``), as strided slices of
    the input: ``F.unfold``'s columns with the other taps left out. On the small maps this strategy
    runs on, ``F.unfold`` cost more than the product (1.2 ms per call at batch 50, 512 channels,
    a 1×1 map, where only the centre tap of a 3×3 kernel is live).

    Shapes: x (B, C_in, H, W); padding (top, left), symmetric → (B, C_in, len(taps), H'·W').
    """
    (_, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = kernel_size, stride, padding, dilation, out_hw
    height, width = x.shape[2:]
    if not taps:  # every tap reads only padding
        return x.new_zeros(x.shape[0], x.shape[1], 0, oh * ow)

    def inside(u: int, d: int, p: int, s: int, out: int, size: int) -> bool:
        return u * d - p >= 0 and (out - 1) * s + u * d - p < size

    padded = not all(
        inside(t // kw, dh, ph, sh, oh, height) and inside(t % kw, dw, pw, sw, ow, width)
        for t in taps
    )
    source, shift_h, shift_w = (F.pad(x, (pw, pw, ph, ph)), 0, 0) if padded else (x, ph, pw)
    slices = []
    for t in taps:
        top, left = (t // kw) * dh - shift_h, (t % kw) * dw - shift_w
        slices.append(
            source[:, :, top : top + (oh - 1) * sh + 1 : sh, left : left + (ow - 1) * sw + 1 : sw]
        )
    return torch.stack(slices, dim=2).reshape(x.shape[0], x.shape[1], len(taps), oh * ow)


def product_kernels(taps: list[int], groups: int, weight: Tensor) -> Tensor:
    """The candidates (n, C_out, C_in / g, kh, kw), taps ``taps`` only, as the right-hand side of
    one product over the batch's rows: (g, C_in / g · T', n · C_out / g)."""
    n, c_out, c_in_g, kh, kw = weight.shape
    kernels = weight.reshape(n, groups, c_out // groups, c_in_g, kh * kw)
    if len(taps) < kh * kw:
        index = torch.tensor(taps, dtype=torch.long, device=weight.device)
        kernels = kernels.index_select(4, index)
    return kernels.permute(1, 3, 4, 0, 2).reshape(groups, c_in_g * len(taps), n * (c_out // groups))


def candidate_outputs_conv(
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
    """Convolve with all ``n`` candidates at once and mix the outputs: no per-sample kernel.

    ``y_b = sum_n a_kn[b, n] · (W_n @ (a_s[b] ⊙ unfold(x_b)))``: one matrix product
    ``(B·L, C_in·T) @ (C_in·T, n·C_out)`` over the im2col rows of the whole batch, then a weighted
    sum over ``n``. It costs ``n`` times the convolution's multiply-adds but never writes the
    ``B × |W|`` per-sample kernels: the cheapest exact form where the map has few positions ``L``
    (``n·L·|W|`` against ``(n + L)·|W|`` plus a pass over ``B × |W|``). Taps that only read padding
    are dropped.

    Args:
        x: (B, C_in, H, W), channel attention applied; weight: (n, C_out, C_in / g, kh, kw);
        kernel_att: (B, n) or None; spatial_att: (B, kh·kw) or None; padding: (top, left),
        symmetric; out_hw: (H', W').

    Returns:
        (B, C_out, H', W').
    """
    batch, _, height, width = x.shape
    n, c_out, c_in_g, kh, kw = weight.shape
    positions = out_hw[0] * out_hw[1]
    if tracing.counting():
        # Counted (fvcore traces) by the convention of static convolutions, padding taps included,
        # so that KR and its static model are compared on one count.
        taps = list(range(kh * kw))
    else:
        taps = live_taps((kh, kw), stride, padding, dilation, (height, width), out_hw)
    cols = tap_columns(x, (kh, kw), stride, padding, dilation, out_hw, taps)  # (B, C_in, T', L)
    live = len(taps)
    if live < kh * kw and spatial_att is not None:
        spatial_att = spatial_att[:, taps]
    if spatial_att is not None:
        cols = cols * spatial_att.to(cols.dtype)[:, None, :, None]
    # Rows of the whole batch: (g, B·L, C_in/g·T') @ (g, C_in/g·T', n·C_out/g).
    rows = cols.reshape(batch, groups, c_in_g * live, positions).permute(1, 0, 3, 2)
    rows = rows.reshape(groups, batch * positions, c_in_g * live)
    kernels = kept_layout(
        weight, ("candidate_outputs", tuple(taps), groups), partial(product_kernels, taps, groups)
    )
    outputs = torch.matmul(rows, kernels.to(rows.dtype))  # (g, B·L, n·C_out/g)
    outputs = outputs.view(groups, batch, positions, n, c_out // groups)
    if kernel_att is None:
        mixed = outputs.sum(3) if n > 1 else outputs[:, :, :, 0]
    else:
        mixed = torch.einsum("gblnc,bn->bgcl", outputs, kernel_att.to(outputs.dtype))
        return mixed.reshape(batch, c_out, *out_hw)
    return mixed.permute(1, 0, 3, 2).reshape(batch, c_out, *out_hw)
