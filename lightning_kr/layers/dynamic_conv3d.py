"""3-D (video) convolution with per-sample aggregated kernels.

The kernel of sample ``b`` is the 2-D one (:mod:`~lightning_kr.layers.dynamic_conv`) over one more
axis::

    W_b = sum_n a_kn[b, n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ W_n

with the spatial attention ``a_s`` spanning the ``kt × kh × kw`` taps (time and space). Strategies:

* ``"shared"``: every sample has the same kernel (n = 1 and no spatial attention): one ordinary
  ``F.conv3d``; channel attention on the input, filter attention on the output.
* ``"grouped"``: the per-sample kernels ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n`` mixed with one
  matrix product ``(B, n) @ (n, |W|)`` and run as one ``groups = B·g`` convolution; channel
  attention on the input, filter attention on the output.
* ``"taps"``: no batch in any shape argument: the per-sample kernels ``K_b`` applied tap by tap,
  ``y_b = sum_taps K_b[tap] @ shifted(x_b)`` as batched matrix products (``kt·kh·kw`` of them).
* ``"reference"``: the textbook method: the full per-sample kernel ``W_b`` (all four attentions
  folded in) through one ``groups = B·g`` convolution.

``"auto"`` is ``"shared"`` where it applies, else ``"grouped"``. Under ``torch.export`` (ONNX) every
per-sample strategy becomes ``"taps"``: a grouped convolution bakes the batch size into
``groups``, the tap products compute the same function for any batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kr.layers.dynamic_conv import fold_channel_filter, mix_candidates

Strategy3d = Literal["auto", "shared", "grouped", "taps", "reference"]
STRATEGIES_3D = ("shared", "grouped", "taps", "reference")


def dynamic_conv3d(
    x: Tensor,
    weight: Tensor,
    *,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    spatial_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int, int, int, int],
    dilation: tuple[int, int, int],
    groups: int,
    strategy: Strategy3d = "auto",
) -> Tensor:
    """``y_b = a_f[b] ⊙ conv3d(a_c[b] ⊙ x_b, K_b) + bias`` for every sample ``b`` at once.

    Args:
        x: input (B, C_in, T, H, W), already padded for non-zero padding modes.
        weight: candidates (n, C_out, C_in / groups, kt, kh, kw).
        channel_att: (B, C_in) or ``None``.
        filter_att: (B, C_out) or ``None``.
        spatial_att: (B, kt·kh·kw) or ``None``.
        kernel_att: (B, n) or ``None`` (then n must be 1).
        bias: (C_out,) or ``None``.
        stride, dilation: per dimension ``(t, h, w)``.
        padding: ``(front, back, top, bottom, left, right)`` zero padding.
        groups: convolution groups.
        strategy: one of :data:`STRATEGIES_3D` or ``"auto"``.

    Returns:
        (B, C_out, T', H', W').
    """
    if strategy == "auto":
        strategy = "shared" if kernel_att is None and spatial_att is None else "grouped"
    if strategy != "shared" and torch.compiler.is_exporting():
        strategy = "taps"
    if strategy not in STRATEGIES_3D:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {('auto', *STRATEGIES_3D)}")
    if strategy == "shared" and (kernel_att is not None or spatial_att is not None):
        raise ValueError("strategy 'shared' needs n = 1 and no spatial attention")
    x, conv_padding = _symmetric_padding(x, padding)
    batch = x.shape[0]
    if strategy == "reference":
        kernels = fold_channel_filter(
            mix_candidates(weight, kernel_att, spatial_att, batch), channel_att, filter_att, groups
        )
        bias = None if bias is None else bias.repeat(batch)
        return _grouped_conv3d(x, kernels, bias, stride, conv_padding, dilation, groups)
    if channel_att is not None:
        x = x * channel_att.to(x.dtype)[:, :, None, None, None]
    if strategy == "shared":
        y = F.conv3d(x, weight[0], None, stride, conv_padding, dilation, groups)
    elif strategy == "taps":
        kernels = mix_candidates(weight, kernel_att, spatial_att, batch)
        y = _taps_conv3d(x, kernels, stride, conv_padding, dilation, groups)
    else:
        kernels = mix_candidates(weight, kernel_att, spatial_att, batch)
        y = _grouped_conv3d(x, kernels, None, stride, conv_padding, dilation, groups)
    if filter_att is not None:
        y = y * filter_att.to(y.dtype)[:, :, None, None, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None, None]
    return y


def _symmetric_padding(
    x: Tensor, padding: tuple[int, int, int, int, int, int]
) -> tuple[Tensor, tuple[int, int, int]]:
    """``x`` and the symmetric ``(t, h, w)`` padding a convolution takes; asymmetric padding
    (``'same'`` with an even kernel) is applied to ``x`` with zeros instead."""
    front, back, top, bottom, left, right = padding
    if front == back and top == bottom and left == right:
        return x, (front, top, left)
    return F.pad(x, (left, right, top, bottom, front, back)), (0, 0, 0)


def _grouped_conv3d(
    x: Tensor,
    kernels: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    groups: int,
) -> Tensor:
    """One ``groups = B·g`` convolution of each sample with its own kernel.

    Args:
        x: (B, C_in, T, H, W); kernels: (B, C_out, C_in / g, kt, kh, kw); bias: (B·C_out,) or None.

    Returns:
        (B, C_out, T', H', W').
    """
    batch, c_in = x.shape[:2]
    _b, c_out, c_in_g, *k = kernels.shape
    y = F.conv3d(
        x.reshape(1, batch * c_in, *x.shape[2:]),
        kernels.reshape(batch * c_out, c_in_g, *k),
        bias,
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return y.view(batch, c_out, *y.shape[2:])


def _taps_conv3d(
    x: Tensor,
    kernels: Tensor,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    groups: int,
) -> Tensor:
    """Each sample convolved with its own kernel, one batched matrix product per tap.

    Args:
        x: (B, C_in, T, H, W); kernels: (B, C_out, C_in / g, kt, kh, kw).

    Returns:
        (B, C_out, T', H', W').
    """
    x = F.pad(x, (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]))
    batch = x.shape[0]
    _b, c_out, c_in_g, *k = kernels.shape
    out = [
        (size - d * (kk - 1) - 1) // s + 1
        for size, kk, s, d in zip(x.shape[2:], k, stride, dilation, strict=True)
    ]
    grouped = kernels.reshape(batch, groups, c_out // groups, c_in_g, *k)
    y = x.new_zeros(batch, groups, c_out // groups, out[0] * out[1] * out[2])
    for i in range(k[0]):
        for j in range(k[1]):
            for m in range(k[2]):
                start = (i * dilation[0], j * dilation[1], m * dilation[2])
                shifted = x[
                    :,
                    :,
                    start[0] : start[0] + stride[0] * (out[0] - 1) + 1 : stride[0],
                    start[1] : start[1] + stride[1] * (out[1] - 1) + 1 : stride[1],
                    start[2] : start[2] + stride[2] * (out[2] - 1) + 1 : stride[2],
                ].reshape(batch, groups, c_in_g, -1)
                y = y + torch.matmul(grouped[..., i, j, m], shifted)
    return y.view(batch, c_out, *out)
