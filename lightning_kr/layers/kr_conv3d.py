"""``KRConv3d``: a 3-D (video) convolution whose kernel is generated per sample from its input and ``d``."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kr.layers.dynamic_conv3d import STRATEGIES_3D, dynamic_conv3d
from lightning_kr.layers.kernel_generator import Attentions
from lightning_kr.layers.kr_conv import KRConvNd


class KRConv3d(KRConvNd):
    """Dynamic 3-D convolution with Kernel Representation (:class:`KRConv2d` over time and space).

    Same arguments as :class:`torch.nn.Conv3d`, plus the KR options. The spatial attention spans
    the ``kt × kh × kw`` taps; ``h`` is the input averaged over time and space.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as in :class:`torch.nn.Conv3d` (``padding='same'`` included).
        kernel_num, repr_dim, reduction, min_hidden, attentions, gate_scale, zero_init, norm:
            as in :class:`~lightning_kr.layers.KRConv2d`.
        strategy: ``"auto"`` or one of ``STRATEGIES_3D`` (``"shared"``, ``"grouped"``,
            ``"reference"``, ``"tap_products"``; see :mod:`lightning_kr.strategies`; all are
            exact).

    Shapes:
        x: (B, C_in, T, H, W); d: (B, D) → y: (B, C_out, T', H', W'), d_next: (B, D).

    Example::

        >>> conv = KRConv3d(8, 16, 3, padding=1, kernel_num=4, repr_dim=8)
        >>> y, d_next = conv.forward_with_repr(torch.randn(2, 8, 4, 6, 6), torch.randn(2, 8))
        >>> y.shape, d_next.shape
        (torch.Size([2, 16, 4, 6, 6]), torch.Size([2, 8]))
    """

    static_type = nn.Conv3d
    strategies = STRATEGIES_3D
    spatial_names = "T, H, W"

    def convolve(self, x: Tensor, att: Attentions, padding: tuple[int, ...]) -> Tensor:
        return dynamic_conv3d(
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
