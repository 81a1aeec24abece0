"""``KRConv1d``: a 1-D convolution whose kernel is generated per sample from its input and ``d``."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kr.layers.dynamic_conv import STRATEGIES, dynamic_conv2d
from lightning_kr.layers.kernel_generator import Attentions
from lightning_kr.layers.kr_conv import KRConvNd


class KRConv1d(KRConvNd):
    """Dynamic 1-D convolution with Kernel Representation.

    The 2-D math on a map of height 1: ``x`` (B, C, L) runs as (B, C, 1, L) with a ``1 × k`` kernel,
    so every strategy of :func:`~lightning_kr.layers.dynamic_conv.dynamic_conv2d` applies unchanged.
    The spatial attention spans the ``k`` taps.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as in :class:`torch.nn.Conv1d` (``padding='same'`` included).
        kernel_num, repr_dim, reduction, min_hidden, attentions, gate_scale, zero_init, norm,
            strategy: as in :class:`~lightning_kr.layers.KRConv2d`.

    Shapes:
        x: (B, C_in, L); d: (B, D) → y: (B, C_out, L'), d_next: (B, D).

    Example::

        >>> conv = KRConv1d(16, 32, 3, padding=1, kernel_num=4, repr_dim=8)
        >>> y, d_next = conv.forward_with_repr(torch.randn(2, 16, 20), torch.randn(2, 8))
        >>> y.shape, d_next.shape
        (torch.Size([2, 32, 20]), torch.Size([2, 8]))
    """

    static_type = nn.Conv1d
    strategies = STRATEGIES
    spatial_names = "L"

    def convolve(self, x: Tensor, att: Attentions, padding: tuple[int, ...]) -> Tensor:
        y = dynamic_conv2d(
            x.unsqueeze(2),
            self.weight.unsqueeze(3),
            channel_att=att.channel,
            filter_att=att.filter,
            spatial_att=att.spatial,
            kernel_att=self.kernel_mixing(att.kernel),
            bias=self.bias,
            stride=(1, *self.stride),
            padding=(0, 0, *padding),
            dilation=(1, *self.dilation),
            groups=self.groups,
            strategy=self.strategy,
        )
        return y.squeeze(2)
