"""``"reference"``: the textbook method (ODConv's code), the benchmark's baseline.

The full per-sample kernel ``W_b = sum_n a_kn[b, n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ W_n`` (all four
attentions folded in) through one ``groups = B·g`` convolution, for every layer.

For: every 2-D and 3-D geometry. Cost: never chosen by ``"auto"`` (``"folded"`` computes the same
with less memory). Not portable: the batch is baked into ``groups``. It is also the plain-operator
twin of ``"folded"``.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.grouped import grouped_conv
from lightning_kr.strategies.kernels import fold_channel_filter, mix_candidates


def reference_conv(
    x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
) -> Tensor:
    """Full per-sample kernels ``W_b`` and one ``groups = B·g`` convolution; ``x`` is the raw input
    (no attention applied)."""
    batch = x.shape[0]
    kernels = fold_channel_filter(
        mix_candidates(weight, att.kernel, att.spatial, batch), att.channel, att.filter, g.groups
    )
    return grouped_conv(x, kernels, None if bias is None else bias.repeat(batch), g)


class Reference(ConvStrategy):
    name = "reference"
    dims = frozenset({2, 3})
    folds_attentions = True

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return reference_conv(x, weight, att, bias, g)
