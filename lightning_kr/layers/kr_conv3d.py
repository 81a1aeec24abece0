"""``KRConv3d``: a 3-D (video) convolution whose kernel is generated per sample from its input and ``d``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _triple

from lightning_kr.layers.dynamic_conv3d import STRATEGIES_3D, Strategy3d, dynamic_conv3d
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, KernelGenerator
from lightning_kr.layers.kr_layer import KRLayer


def _resolve_padding(
    padding: str | int | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """``(before_0, after_0, before_1, after_1, …)`` for ``padding`` as ``nn.Conv3d`` accepts it."""
    if padding == "valid":
        return (0,) * (2 * len(kernel))
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return tuple(p for total in totals for p in (total // 2, total - total // 2))
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a triple; got {padding!r}")
    return tuple(p for p in _triple(padding) for _ in range(2))


class KRConv3d(KRLayer):
    """Dynamic 3-D convolution with Kernel Representation (:class:`KRConv2d` over time and space).

    Same arguments as :class:`torch.nn.Conv3d`, plus the KR options. The spatial attention spans
    the ``kt × kh × kw`` taps; ``h`` is the input averaged over time and space.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as in :class:`torch.nn.Conv3d` (``padding='same'`` included).
        kernel_num, repr_dim, reduction, min_hidden, attentions, gate_scale, zero_init, normalize:
            as in :class:`~lightning_kr.layers.KRConv2d`.
        strategy: one of ``"auto"``, ``"shared"``, ``"grouped"``, ``"reference"`` (see
            :mod:`~lightning_kr.layers.dynamic_conv3d`; all are exact).

    Shapes:
        x: (B, C_in, T, H, W); d: (B, D) → y: (B, C_out, T', H', W'), d_next: (B, D).

    Example::

        >>> conv = KRConv3d(8, 16, 3, padding=1, kernel_num=4, repr_dim=8)
        >>> y, d_next = conv.forward_with_repr(torch.randn(2, 8, 4, 6, 6), torch.randn(2, 8))
        >>> y.shape, d_next.shape
        (torch.Size([2, 16, 4, 6, 6]), torch.Size([2, 8]))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: str | int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
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
        strategy: Strategy3d = "auto",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        if kernel_num < 1:
            raise ValueError(f"kernel_num must be >= 1; got {kernel_num}")
        if strategy != "auto" and strategy not in STRATEGIES_3D:
            raise ValueError(
                f"strategy must be 'auto' or one of {list(STRATEGIES_3D)}; got {strategy!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.dilation = _triple(dilation)
        self.padding = padding
        self.groups = groups
        self.padding_mode = padding_mode
        self.kernel_num = kernel_num
        self.strategy = strategy
        if padding == "same" and self.stride != (1, 1, 1):
            raise ValueError(
                "padding='same' is not supported for strided convolutions (as nn.Conv3d)"
            )
        self._padding = _resolve_padding(padding, self.kernel_size, self.dilation)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        depthwise = groups == in_channels and groups > 1 and out_channels // groups == 1
        self.generator = KernelGenerator(
            in_channels,
            out_channels,
            math.prod(self.kernel_size),
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
    def from_conv(cls, conv: nn.Conv3d, *, init_noise: float = 0.1, **kr_options) -> KRConv3d:
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

    def to_static(self) -> nn.Conv3d:
        """The static ``nn.Conv3d`` of the same shape (weight: :meth:`static_weight`)."""
        conv = nn.Conv3d(
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
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KRConv3d '{self.kr_name or '?'}' expects input of shape "
                f"(B, {self.in_channels}, T, H, W); got {tuple(x.shape)}"
            )

    def forward_with_repr(self, x: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(y, d_next)`` for input ``x`` (B, C_in, T, H, W) and ``d`` (B, D) or None."""
        self._check_input(x)
        att = self.generator(x.mean(dim=(2, 3, 4)), d)
        padding = self._padding
        if self.padding_mode != "zeros":
            front, back, top, bottom, left, right = padding
            x = F.pad(x, (left, right, top, bottom, front, back), mode=self.padding_mode)
            padding = (0,) * 6
        y = dynamic_conv3d(
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
        return y, att.repr_out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"kernel_num={self.kernel_num}, bias={self.bias is not None}"
        )
