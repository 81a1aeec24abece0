"""``"grouped"``: the per-sample kernels stacked and run as one ``groups = B·g`` convolution.

``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n`` is mixed with one matrix product ``(B, n) @ (n, |W|)``;
channel attention scales the input and filter attention the output.

For: every 2-D and 3-D geometry. Cost: mixing the candidates and convolving,
``(n + L + 2·PER_SAMPLE_KERNEL_COST)·|W|``, at the library convolution's speed where it is well
used — one sample, grouped convolutions, and dense ones on large maps (1.2x the static convolution
at 56², 64 channels) — and 10x slower on dense small maps (8–14x measured at 7², 512 channels) or
with 1×1 kernels (``python recipes/layer_benchmark.py``, ResNet-18 shapes, batch 32). Not portable:
the batch is baked into ``groups``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.kernels import mix_candidates

CONVOLUTIONS = {2: F.conv2d, 3: F.conv3d}
POORLY_USED = 10
"""Slowdown of a ``groups = B`` convolution where the library runs it poorly (see the module)."""


def grouped_conv(x: Tensor, kernels: Tensor, bias: Tensor | None, g: ConvGeometry) -> Tensor:
    """One ``groups = B·g`` convolution of each sample with its own kernel.

    Args:
        x: (B, C_in, *size); kernels: (B, C_out, C_in / g, *k); bias: (B·C_out,) or None.

    Returns:
        (B, C_out, *out_size).
    """
    batch, c_in = x.shape[:2]
    _b, c_out, c_in_g, *k = kernels.shape
    y = CONVOLUTIONS[g.dims](
        x.reshape(1, batch * c_in, *x.shape[2:]),
        kernels.reshape(batch * c_out, c_in_g, *k),
        bias,
        g.stride,
        g.padding,
        g.dilation,
        g.groups * batch,
    )
    return y.view(batch, c_out, *y.shape[2:])


def grouped_cost(g: ConvGeometry, folded: bool) -> float | None:
    """Cost of a ``groups = B`` convolution with per-sample kernels: the same for ``"grouped"`` and
    ``"folded"``, plus half a multiply-add (a tie-break) for the one that applies channel and filter
    attention with more numbers: folding them into the kernel (``|W|``) or scaling the input and
    output (the activations)."""
    if g.batch is None:
        return None
    poorly_used = g.dense and g.batch > 1 and (g.small_map or g.taps == 1)
    fold_first = bool(g.kernel_elements <= g.activation_elements)
    worse = fold_first != folded
    return g.mixing_cost * (POORLY_USED if poorly_used else 1) + (0.5 if worse else 0.0)


class Grouped(ConvStrategy):
    name = "grouped"
    dims = frozenset({2, 3})

    def cost(self, geometry: ConvGeometry) -> float | None:
        return grouped_cost(geometry, folded=False)

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        kernels = mix_candidates(weight, att.kernel, att.spatial, x.shape[0])
        return grouped_conv(x, kernels, None, g)
