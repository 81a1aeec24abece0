"""``KRConv2d``: a 2-D convolution whose kernel is generated per sample from its input and from ``d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lightning_kr.layers.dynamic_conv import STRATEGIES, Strategy, dynamic_conv2d
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, KernelGenerator
from lightning_kr.layers.kr_layer import KRLayer


def _resolve_padding(
    padding: str | int | tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` for ``padding`` as ``nn.Conv2d`` accepts it."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair; got {padding!r}")
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


class KRConv2d(KRLayer):
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
        gate_scale, zero_init, normalize: see :class:`KernelGenerator` (the defaults start
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

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
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
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding
        self.groups = groups
        self.padding_mode = padding_mode
        self.kernel_num = kernel_num
        self.strategy = strategy
        if padding == "same" and self.stride != (1, 1):
            raise ValueError(
                "padding='same' is not supported for strided convolutions (as nn.Conv2d)"
            )
        self._padding = _resolve_padding(padding, self.kernel_size, self.dilation)
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_channels, in_channels // groups, kh, kw)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        depthwise = groups == in_channels and groups > 1 and out_channels // groups == 1
        self.generator = KernelGenerator(
            in_channels,
            out_channels,
            kh * kw,
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
    def from_conv(cls, conv: nn.Conv2d, *, init_noise: float = 0.1, **kr_options) -> KRConv2d:
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

    def to_static(self) -> nn.Conv2d:
        """The static ``nn.Conv2d`` of the same shape (weight: :meth:`static_weight`)."""
        conv = nn.Conv2d(
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
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KRConv2d '{self.kr_name or '?'}' expects input of shape (B, {self.in_channels}, H, W); "
                f"got {tuple(x.shape)}"
            )

    def forward_with_repr(self, x: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(y, d_next)`` for input ``x`` (B, C_in, H, W) and representation ``d`` (B, D) or None."""
        self._check_input(x)
        att = self.generator(x.mean(dim=(2, 3)), d)
        padding = self._padding
        if self.padding_mode != "zeros":
            top, bottom, left, right = padding
            x = F.pad(x, (left, right, top, bottom), mode=self.padding_mode)
            padding = (0, 0, 0, 0)
        y = dynamic_conv2d(
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
