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
* ``"reference"``: the textbook method: the full per-sample kernel ``W_b`` (all four attentions
  folded in) through one ``groups = B·g`` convolution.

``"auto"`` is ``"shared"`` where it applies, else ``"grouped"``. Under ``torch.export`` the grouped
form is kept: it bakes the batch size into ``groups``, so an exported 3-D layer runs at the batch
it was exported with (there is no batch-independent 3-D form, unlike the 2-D ``"taps"`` /
``"unfold"``; ONNX export of video models is not a goal).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_kr.layers.dynamic_conv import fold_channel_filter, mix_candidates

Strategy3d = Literal["auto", "shared", "grouped", "reference"]
STRATEGIES_3D = ("shared", "grouped", "reference")


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
