"""``"shared"``: every sample has the same kernel, so one ordinary convolution.

For: n = 1 and no spatial attention (channel and filter attention scale the input and the output);
2-D and 3-D. Cost: ``L·|W|``, the static convolution's. Portable.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry

CONVOLUTIONS = {2: F.conv2d, 3: F.conv3d}


class Shared(ConvStrategy):
    name = "shared"
    dims = frozenset({2, 3})
    portable = True

    def applies(self, geometry: ConvGeometry) -> str | None:
        if geometry.per_sample_kernel:
            return "n = 1 and no spatial attention"
        return None

    def cost(self, geometry: ConvGeometry) -> float | None:
        return geometry.plain_cost

    def convolve(
        self, x: Tensor, weight: Tensor, att: ConvAttentions, bias: Tensor | None, g: ConvGeometry
    ) -> Tensor:
        return CONVOLUTIONS[g.dims](x, weight[0], None, g.stride, g.padding, g.dilation, g.groups)
