"""3-D (video) convolution with per-sample aggregated kernels: choose a strategy and call it.

The kernel of sample ``b`` is the 2-D one (:mod:`~lightning_kr.layers.dynamic_conv`) over one more
axis, with the spatial attention ``a_s`` spanning the ``kt × kh × kw`` taps (time and space). The
3-D strategies are those of :mod:`lightning_kr.strategies` for rank-3 kernels: ``"shared"``,
``"grouped"``, ``"reference"`` and ``"tap_products"`` (called ``"taps"`` before; the old name is
still accepted, with a warning). ``"auto"`` is ``"shared"`` where it applies, else ``"grouped"``;
under ``torch.export`` (ONNX) every per-sample call runs ``"tap_products"``, which holds for any
batch.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_kr.layers.dynamic_conv import _dynamic_conv
from lightning_kr.strategies import registry
from lightning_kr.strategies.geometry import ConvAttentions

STRATEGIES_3D: tuple[str, ...] = registry.names(3)
"""The strategies of 3-D layers, from :data:`~lightning_kr.strategies.registry.REGISTRY`."""

Strategy3d = Literal[("auto", *STRATEGIES_3D)]  # type: ignore[valid-type]


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
    strategy: str = "auto",
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
    return _dynamic_conv(
        x, weight, ConvAttentions(channel_att, filter_att, spatial_att, kernel_att), bias,
        stride, padding, dilation, groups, strategy,
    )  # fmt: skip
