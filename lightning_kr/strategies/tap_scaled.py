"""``"tap_scaled"``: one candidate with spatial attention, without any per-sample kernel.

``a_s`` scales the im2col columns tap by tap and one ordinary matrix product with the static kernel
follows: ``"unfold"``'s computation (:mod:`~lightning_kr.strategies.unfold`) where n = 1.

For: 2-D geometries (1-D as height-1 maps) with n = 1. Cost: the static convolution's ``L·|W|``,
the fastest form for strided dense convolutions on small maps; 1.5x at stride 1 (the columns are
k² copies of the input), 2x on large maps; not a contender at batch 1, with groups, or under
``torch.export`` (which takes ``"unfold"``, the same product). Portable.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.unfold import LARGE_MAP_SLOWER, SLOWER, unfold_columns


class TapScaled(ConvStrategy):
    name = "tap_scaled"
    dims = frozenset({2})
    portable = True

    def applies(self, g: ConvGeometry) -> str | None:
        return "n = 1" if g.has_kernel else None

    def cost(self, g: ConvGeometry) -> float | None:
        if g.batch is None or g.batch == 1 or not g.dense:
            return None
        if not g.small_map:
            return g.plain_cost * LARGE_MAP_SLOWER
        return g.plain_cost * (SLOWER if g.unit_stride else 1)

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return unfold_columns(x, weight, att, bias, g)
