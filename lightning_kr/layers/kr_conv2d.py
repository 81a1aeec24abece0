"""``KRConv2d``: a 2-D convolution whose kernel is generated per sample from its input and from ``d``."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kr.layers.dynamic_conv import STRATEGIES, dynamic_conv2d
from lightning_kr.layers.kernel_generator import Attentions
from lightning_kr.layers.kr_conv import KRConvNd


class KRConv2d(KRConvNd):
    """Dynamic 2-D convolution with Kernel Representation.

    Same arguments as :class:`torch.nn.Conv2d`, plus the KR options. ``forward(x)`` reads ``d`` from the
    chain it is attached to; ``forward_with_repr(x, d)`` is the pure form.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as in :class:`torch.nn.Conv2d` (``padding='same'`` included).
        kernel_num: number of candidate kernels ``n`` ("1x" = 1, "4x" = 4).
        repr_dim: size ``D`` of the kernel representation; 0 = no representation (ODConv / DyConv).
        reduction, min_hidden: attention hidden width ``max(C_in · reduction, min_hidden)``.
        attentions: subset of ``("channel", "filter", "spatial", "kernel")``.
        gate_scale, zero_init, norm: see :class:`KernelGenerator` (the defaults start
            with neutral attentions: the layer computes the static convolution at initialisation).
        strategy: how per-sample kernels are applied (``"auto"`` picks by shape; all are exact).

    Shapes:
        x: (B, C_in, H, W); d: (B, D) → y: (B, C_out, H', W'), d_next: (B, D).

    Example::

        >>> conv = KRConv2d(16, 32, 3, padding=1, kernel_num=4, repr_dim=8)
        >>> y, d_next = conv.forward_with_repr(torch.randn(2, 16, 8, 8), torch.randn(2, 8))
        >>> y.shape, d_next.shape
        (torch.Size([2, 32, 8, 8]), torch.Size([2, 8]))
    """

    static_type = nn.Conv2d
    strategies = STRATEGIES
    spatial_names = "H, W"

    def convolve(self, x: Tensor, att: Attentions, padding: tuple[int, ...]) -> Tensor:
        return dynamic_conv2d(
            x,
            self.weight,
            channel_att=att.channel,
            filter_att=att.filter,
            spatial_att=att.spatial,
            kernel_att=self.kernel_mixing(att.kernel),
            bias=self.bias,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            groups=self.groups,
            strategy=self.strategy,
        )
