"""``KRConv1d``: a 1-D convolution whose kernel is generated per sample from its input and ``d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _single

from lightning_kr.layers.dynamic_conv import STRATEGIES, Strategy, dynamic_conv2d
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, KernelGenerator
from lightning_kr.layers.kr_conv2d import _resolve_padding
from lightning_kr.layers.kr_layer import KRLayer


class KRConv1d(KRLayer):
    """Dynamic 1-D convolution with Kernel Representation.

    The 2-D math on a map of height 1: ``x`` (B, C, L) runs as (B, C, 1, L) with a ``1 × k`` kernel,
    so every strategy of :func:`~lightning_kr.layers.dynamic_conv.dynamic_conv2d` applies unchanged.
    The spatial attention spans the ``k`` taps.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as in :class:`torch.nn.Conv1d` (``padding='same'`` included).
        kernel_num, repr_dim, reduction, min_hidden, attentions, gate_scale, zero_init, normalize,
            strategy: as in :class:`~lightning_kr.layers.KRConv2d`.

    Shapes:
        x: (B, C_in, L); d: (B, D) → y: (B, C_out, L'), d_next: (B, D).

    Example::

        >>> conv = KRConv1d(16, 32, 3, padding=1, kernel_num=4, repr_dim=8)
        >>> y, d_next = conv.forward_with_repr(torch.randn(2, 16, 20), torch.randn(2, 8))
        >>> y.shape, d_next.shape
        (torch.Size([2, 32, 20]), torch.Size([2, 8]))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: str | int | tuple[int] = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        kernel_num: int = 1,
        repr_dim: int = 32,
        reduction: float = 1 / 16,
        min_hidden: int = 16,
        attentions: tuple[str, ...] = ATTENTION_KINDS,
        gate_scale: float = 2.0,
        zero_init: bool = True,
        normalize: bool = True,
        strategy: Strategy = "auto",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        if kernel_num < 1:
            raise ValueError(f"kernel_num must be >= 1; got {kernel_num}")
        if strategy != "auto" and strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be 'auto' or one of {list(STRATEGIES)}; got {strategy!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _single(kernel_size)
        self.stride = _single(stride)
        self.dilation = _single(dilation)
        self.padding = padding
        self.groups = groups
        self.padding_mode = padding_mode
        self.kernel_num = kernel_num
        self.strategy = strategy
        if padding == "same" and self.stride != (1,):
            raise ValueError(
                "padding='same' is not supported for strided convolutions (as nn.Conv1d)"
            )
        # (0, 0, left, right): the 2-D padding of the height-1 map.
        self._padding = _resolve_padding(
            padding if isinstance(padding, str) else (0, _single(padding)[0]),
            (1, *self.kernel_size),
            (1, *self.dilation),
        )
        (k,) = self.kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels // groups, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        depthwise = groups == in_channels and groups > 1 and out_channels // groups == 1
        self.generator = KernelGenerator(
            in_channels,
            out_channels,
            k,
            kernel_num=kernel_num,
            repr_dim=repr_dim,
            reduction=reduction,
            min_hidden=min_hidden,
            attentions=attentions,
            depthwise=depthwise,
            gate_scale=gate_scale,
            zero_init=zero_init,
            normalize=normalize,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for candidate in self.weight:
            nn.init.kaiming_normal_(candidate, mode="fan_out", nonlinearity="relu")
        with torch.no_grad():
            self.weight.div_(self.mix_scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, *, init_noise: float = 0.1, **kr_options) -> KRConv1d:
        """A KR layer whose candidates start from ``conv``'s weights (and keeps its bias)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            **kr_options,
        )
        layer.load_static(conv, init_noise)
        return layer

    def to_static(self) -> nn.Conv1d:
        """The static ``nn.Conv1d`` of the same shape (weight: :meth:`static_weight`)."""
        conv = nn.Conv1d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return self.store_static(conv)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KRConv1d '{self.kr_name or '?'}' expects input of shape (B, {self.in_channels}, L); "
                f"got {tuple(x.shape)}"
            )

    def forward_with_repr(self, x: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(y, d_next)`` for input ``x`` (B, C_in, L) and representation ``d`` (B, D) or None."""
        self._check_input(x)
        att = self.generator(x.mean(dim=2), d)
        padding = self._padding
        if self.padding_mode != "zeros":
            _top, _bottom, left, right = padding
            x = F.pad(x, (left, right), mode=self.padding_mode)
            padding = (0, 0, 0, 0)
        y = dynamic_conv2d(
            x.unsqueeze(2),
            self.weight.unsqueeze(3),
            channel_att=att.channel,
            filter_att=att.filter,
            spatial_att=att.spatial,
            kernel_att=self.kernel_mixing(att.kernel),
            bias=self.bias,
            stride=(1, *self.stride),
            padding=padding,
            dilation=(1, *self.dilation),
            groups=self.groups,
            strategy=self.strategy,
        )
        return y.squeeze(2), att.repr_out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"kernel_num={self.kernel_num}, bias={self.bias is not None}"
        )
