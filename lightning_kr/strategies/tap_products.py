"""``"tap_products"``: per-sample kernels applied tap by tap, as batched matrix products (3-D).

``y_b = sum_taps K_b[tap] @ shifted(x_b)``, one batched matrix product per tap (``kt·kh·kw`` of
them), with ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n``: no batch in any shape argument.

For: 3-D convolutions (any stride, dilation and groups). Cost: the convolution plus mixing, under
``torch.export`` only (slower than a grouped convolution in eager mode). Portable: what
``torch.export`` takes for 3-D layers with per-sample kernels (a grouped convolution would bake the
batch into ``groups``). Called ``"taps"`` before, which is still accepted for 3-D layers; the 2-D
``"taps"`` is a different algorithm (:mod:`~lightning_kr.strategies.taps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.kernels import mix_candidates


class TapProducts(ConvStrategy):
    name = "tap_products"
    dims = frozenset({3})
    portable = True

    def cost(self, g: ConvGeometry) -> float | None:
        return g.mixing_cost if g.batch is None else None

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        kernels = mix_candidates(weight, att.kernel, att.spatial, x.shape[0])
        return tap_products_conv(x, kernels, g.stride, g.padding, g.dilation, g.groups)


def tap_products_conv(
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
