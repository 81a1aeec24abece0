"""``KRLinear``: a linear layer whose weight is generated per sample from its input and from ``d``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kr.layers.dynamic_conv import dynamic_linear
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, KernelGenerator
from lightning_kr.layers.kr_layer import KRLayer


class KRLinear(KRLayer):
    """Dynamic linear layer with Kernel Representation.

    ``h`` is the input itself for (B, C) inputs and the mean over every non-batch, non-channel
    dimension for token inputs (B, N, C) or (B, H, W, C). Attentions: input-channel, output-channel
    and kernel-number (a linear layer has no spatial extent).

    Args:
        in_features, out_features, bias: as in :class:`torch.nn.Linear`.
        kernel_num, repr_dim, reduction, min_hidden, attentions, gate_scale, zero_init,
            norm: see
            :class:`~lightning_kr.layers.KRConv2d`.

    Shapes:
        x: (B, C_in) or (B, *, C_in); d: (B, D) → y: same leading shape with C_out, d_next: (B, D).

    Example::

        >>> fc = KRLinear(32, 10, kernel_num=4, repr_dim=8)
        >>> y, d_next = fc.forward_with_repr(torch.randn(2, 5, 32), torch.randn(2, 8))
        >>> y.shape
        torch.Size([2, 5, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        kernel_num: int = 1,
        repr_dim: int = 32,
        reduction: float = 1 / 16,
        min_hidden: int = 16,
        attentions: tuple[str, ...] = ATTENTION_KINDS,
        gate_scale: float = 2.0,
        zero_init: bool = True,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if kernel_num < 1:
            raise ValueError(f"kernel_num must be >= 1; got {kernel_num}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_num = kernel_num
        self.weight = nn.Parameter(torch.empty(kernel_num, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.generator = KernelGenerator(
            in_features,
            out_features,
            1,
            kernel_num=kernel_num,
            repr_dim=repr_dim,
            reduction=reduction,
            min_hidden=min_hidden,
            attentions=attentions,
            gate_scale=gate_scale,
            zero_init=zero_init,
            norm=norm,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for candidate in self.weight:
            static = nn.Linear(self.in_features, self.out_features)
            candidate.data.copy_(static.weight.data / self.mix_scale)
        if self.bias is not None:
            bound = 1 / self.in_features**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, init_noise: float = 0.1, **kr_options) -> KRLinear:
        """A KR layer whose candidates start from ``linear``'s weights (and keeps its bias)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kr_options)
        layer.load_static(linear, init_noise)
        return layer

    def to_static(self) -> nn.Linear:
        """The static ``nn.Linear`` of the same shape (weight: :meth:`static_weight`)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return self.store_static(linear)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"KRLinear '{self.kr_name or '?'}' expects input of shape (B, {self.in_features}) or "
                f"(B, *, {self.in_features}); got {tuple(x.shape)}"
            )

    def forward_with_repr(self, x: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(y, d_next)`` for input ``x`` (B, [*,] C_in) and representation ``d`` (B, D) or None."""
        self._check_input(x)
        batch = x.shape[0]
        tokens = x.reshape(batch, -1, self.in_features)
        att = self.generator(tokens.mean(dim=1), d)
        y = dynamic_linear(
            tokens,
            self.weight,
            channel_att=att.channel,
            filter_att=att.filter,
            kernel_att=self.kernel_mixing(att.kernel),
            bias=self.bias,
        )
        return y.reshape(*x.shape[:-1], self.out_features), att.repr_out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel_num={self.kernel_num}, bias={self.bias is not None}"
        )
