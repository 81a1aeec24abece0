"""``KRConvNd``: what the 1-, 2- and 3-D KR convolutions share — arguments, candidates, generator.

A subclass names its static twin (``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``), its strategies,
and how it convolves (:meth:`KRConvNd.convolve`); everything else is here: the arguments of the
torch convolution plus the KR options, the ``n`` candidate kernels, the :class:`KernelGenerator`
(spatial attention over every tap of the kernel, ``h`` = the input averaged over every spatial
dimension), non-zero padding modes, and the way to and from the static layer.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, Attentions, KernelGenerator
from lightning_kr.layers.kr_layer import KRLayer


def resolve_padding(
    padding: str | int | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """``(before_0, after_0, before_1, after_1, …)`` for ``padding`` as ``nn.ConvNd`` accepts it
    (``"same"`` puts the odd pixel after, as torch does)."""
    if padding == "valid":
        return (0,) * (2 * len(kernel))
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return tuple(p for total in totals for p in (total // 2, total - total // 2))
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a tuple; got {padding!r}")
    sizes = (padding,) * len(kernel) if isinstance(padding, int) else tuple(padding)
    return tuple(p for p in sizes for _ in range(2))


def _as_tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


class KRConvNd(KRLayer, abc.ABC):
    """Base of :class:`KRConv1d`, :class:`KRConv2d` and :class:`KRConv3d` (see those)."""

    static_type: ClassVar[type[nn.Module]]
    strategies: ClassVar[tuple[str, ...]]
    spatial_names: ClassVar[str]  # for error messages: "L", "H, W", "T, H, W"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
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
        norm: str = "batch",
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        dims = len(self.spatial_names.split(", "))
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        if kernel_num < 1:
            raise ValueError(f"kernel_num must be >= 1; got {kernel_num}")
        if strategy != "auto" and strategy not in self.strategies:
            raise ValueError(
                f"strategy must be 'auto' or one of {list(self.strategies)}; got {strategy!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _as_tuple(kernel_size, dims)
        self.stride = _as_tuple(stride, dims)
        self.dilation = _as_tuple(dilation, dims)
        self.padding = padding
        self.groups = groups
        self.padding_mode = padding_mode
        self.kernel_num = kernel_num
        self.strategy = strategy
        if padding == "same" and self.stride != (1,) * dims:
            raise ValueError(
                "padding='same' is not supported for strided convolutions (as "
                f"nn.{self.static_type.__name__})"
            )
        self._padding = resolve_padding(padding, self.kernel_size, self.dilation)
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
            norm=norm,
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
    def from_conv(cls, conv: nn.Module, *, init_noise: float = 0.1, **kr_options) -> KRConvNd:
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

    def to_static(self) -> nn.Module:
        """The static convolution of the same shape (weight: :meth:`static_weight`)."""
        conv = self.static_type(
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
        if x.dim() != self.weight.dim() - 1 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} '{self.kr_name or '?'}' expects input of shape "
                f"(B, {self.in_channels}, {self.spatial_names}); got {tuple(x.shape)}"
            )

    def forward_with_repr(self, x: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(y, d_next)`` for input ``x`` (B, C_in, *spatial) and ``d`` (B, D) or None."""
        self._check_input(x)
        att = self.generator(x.mean(dim=tuple(range(2, x.dim()))), d)
        padding = self._padding
        if self.padding_mode != "zeros":
            last_first = [
                p for i in reversed(range(0, len(padding), 2)) for p in padding[i : i + 2]
            ]
            x = F.pad(x, last_first, mode=self.padding_mode)
            padding = (0,) * len(padding)
        return self.convolve(x, att, padding), att.repr_out

    @abc.abstractmethod
    def convolve(self, x: Tensor, att: Attentions, padding: tuple[int, ...]) -> Tensor:
        """``y`` for the (mode-padded) input ``x`` with the attentions ``att`` and zero padding
        ``(before_0, after_0, …)``; each of KRConv1d / 2d / 3d implements it."""

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"kernel_num={self.kernel_num}, bias={self.bias is not None}"
        )
