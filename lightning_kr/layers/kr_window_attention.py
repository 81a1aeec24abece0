"""``KRShiftedWindowAttention``: Swin's (shifted) window attention with KR ``qkv`` and ``proj`` layers.

torchvision's Swin attention modules (``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2`` and the
video ``ShiftedWindowAttention3d``) hand their ``qkv`` and ``proj`` weights to a functional
``shifted_window_attention`` that applies them to (B·num_windows, N, C) windows, so replacing the
``Linear`` modules alone never reaches them, and a KR layer there would see the windows, not the
images, on its batch dimension.

A linear layer acts token by token and the cyclic shift and the window partition only permute
tokens, so both projections commute with them. This module applies the KR ``qkv`` to the image's
token map before the shift and the partition and the KR ``proj`` after their reversal: each image
generates one kernel per projection (its ``d`` serves all of its windows) and the chain's ``d`` keeps
the image batch. Both KR layers see only the image's own tokens (``h`` is their mean), not the zero
padding up to a multiple of the window; padded tokens get ``qkv`` = bias, as in torchvision.

The window math (padding, shift rules, partition, relative position bias, shift mask, v2's cosine
attention with its clamped ``logit_scale`` and its zeroed key bias) follows torchvision's
``swin_transformer.py`` and ``video/swin_transformer.py`` (BSD-3-Clause), generalised to two or three
window dimensions.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
)
from torchvision.models.swin_transformer import (
    _get_relative_position_bias as _relative_position_bias_2d,
)
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d
from torchvision.models.video.swin_transformer import (
    _get_relative_position_bias as _relative_position_bias_3d,
)

from lightning_kr.layers.kr_linear import KRLinear

Variant = Literal["v1", "v2", "3d"]
SWIN_ATTENTIONS: dict[Variant, type[nn.Module]] = {
    "v1": ShiftedWindowAttention,
    "v2": ShiftedWindowAttentionV2,
    "3d": ShiftedWindowAttention3d,
}
"""The torchvision class of each variant (matched by exact type: V2 subclasses V1)."""

_LINKS = ("qkv", "proj")


def _partition(x: Tensor, window: list[int]) -> Tensor:
    """Windows of a token map: (B, *P, C) → (B, num_windows, N, C), N = prod(window)."""
    batch, *padded, channels = x.shape
    n = len(window)
    grid = [p // w for p, w in zip(padded, window, strict=True)]
    x = x.view(batch, *itertools.chain.from_iterable(zip(grid, window, strict=True)), channels)
    x = x.permute(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)
    return x.reshape(batch, math.prod(grid), math.prod(window), channels)


def _merge(windows: Tensor, window: list[int], padded: list[int]) -> Tensor:
    """Inverse of :func:`_partition`: (B, num_windows, N, C) → (B, *P, C)."""
    batch, _, _, channels = windows.shape
    n = len(window)
    grid = [p // w for p, w in zip(padded, window, strict=True)]
    x = windows.view(batch, *grid, *window, channels)
    x = x.permute(
        0, *itertools.chain.from_iterable((1 + i, 1 + n + i) for i in range(n)), 2 * n + 1
    )
    return x.reshape(batch, *padded, channels)


def _shift_mask(padded: list[int], window: list[int], shift: list[int], like: Tensor) -> Tensor:
    """Additive mask (num_windows, N, N) of a shifted map: -100 between tokens of different regions.

    The regions of the rolled map are labelled and compared as in torchvision (a zero shift along a
    dimension leaves that dimension one region).
    """
    regions = like.new_zeros(padded)
    slices = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift, strict=True)]
    for label, corner in enumerate(itertools.product(*slices)):
        regions[tuple(slice(start, stop) for start, stop in corner)] = label
    labels = _partition(regions[None, ..., None], window)[0, ..., 0]  # (num_windows, N)
    differ = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros_like(differ, dtype=like.dtype).masked_fill(differ, -100.0)


class KRShiftedWindowAttention(nn.Module):
    """Swin window attention (v1, v2 or 3-D) whose ``qkv`` and ``proj`` are :class:`KRLinear` links.

    Built from torchvision's module by :meth:`from_swin`; it keeps that module's parameter and buffer
    names (``relative_position_bias_table``, ``relative_position_index``; v2: ``logit_scale``,
    ``cpb_mlp``, ``relative_coords_table``) and adds the KR ones. ``qkv`` then ``proj`` are two links of
    the ``d`` chain, called in that order.

    Args:
        dim, window_size, shift_size, num_heads, qkv_bias, proj_bias, attention_dropout, dropout: as
            in torchvision's ``ShiftedWindowAttention`` (2 window dims for v1/v2, 3 for 3d).
        variant: ``"v1"``, ``"v2"`` (cosine attention, continuous position bias) or ``"3d"`` (video).
        **kr_options: forwarded to both :class:`KRLinear` layers.

    Shapes:
        x: (B, H, W, C) (3d: (B, T, H, W, C)) → same shape. Inside, with the map padded to P (a
        multiple of the window), N tokens per window, h heads of size C/h: qkv (B, *P, 3C); q, k, v
        (B, num_windows, h, N, C/h); attention (B, num_windows, h, N, N); relative position bias
        (1, h, N, N); shift mask (num_windows, 1, N, N). Each KR layer reads ``d`` (B, D) and writes ``d_next`` (B, D).

    Example::

        >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
        >>> swin = ShiftedWindowAttention(32, [4, 4], [2, 2], num_heads=2)
        >>> attn = KRShiftedWindowAttention.from_swin(swin, repr_dim=8)
        >>> chain = ReprChain()
        >>> attn.qkv.attach(chain, "attn.qkv"); attn.proj.attach(chain, "attn.proj")
        >>> with chain.run(torch.randn(2, 8)):
        ...     y = attn(torch.randn(2, 7, 5, 32))
        >>> y.shape
        torch.Size([2, 7, 5, 32])
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        *,
        variant: Variant = "v1",
        **kr_options,
    ) -> None:
        super().__init__()
        if variant not in SWIN_ATTENTIONS:
            raise ValueError(f"variant must be one of {list(SWIN_ATTENTIONS)}; got {variant!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.variant = variant
        self.dim = dim
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = KRLinear(dim, 3 * dim, qkv_bias, **kr_options)
        self.proj = KRLinear(dim, dim, proj_bias, **kr_options)
        # The position-bias state, initialised (and named) exactly as torchvision does.
        static = self._static_module(qkv_bias, proj_bias)
        for name, child in static.named_children():
            if name not in _LINKS:
                self.add_module(name, child)
        if variant == "v2":
            # The continuous position bias is KR too: its MLP's kernels come from each image's d,
            # so each image gets its own relative position bias (B, h, N, N).
            self.cpb_mlp = nn.Sequential(
                KRLinear(2, static.cpb_mlp[0].out_features, True, **kr_options),
                nn.ReLU(),
                KRLinear(static.cpb_mlp[2].in_features, num_heads, False, **kr_options),
            )
        for name, parameter in static.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in static.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def _static_module(self, qkv_bias: bool, proj_bias: bool) -> nn.Module:
        return SWIN_ATTENTIONS[self.variant](
            self.dim,
            list(self.window_size),
            list(self.shift_size),
            self.num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
        )

    def _window_state(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s state dict without its KR links (the projections, v2's position-bias MLP)."""
        links = (*_LINKS, "cpb_mlp")
        return {k: v for k, v in module.state_dict().items() if k.split(".", 1)[0] not in links}

    @classmethod
    def from_swin(
        cls, module: nn.Module, *, init_noise: float = 0.1, **layer_options
    ) -> KRShiftedWindowAttention:
        """Replace torchvision's ``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2`` or
        ``ShiftedWindowAttention3d`` (the KR candidates start from its ``qkv`` / ``proj`` weights, the
        rest of its state is copied)."""
        variants = {static: variant for variant, static in SWIN_ATTENTIONS.items()}
        variant = variants.get(type(module))
        if variant is None:
            raise TypeError(
                "KRShiftedWindowAttention.from_swin expects one of "
                f"{[c.__name__ for c in SWIN_ATTENTIONS.values()]}; got {type(module).__name__}"
            )
        layer = cls(
            module.qkv.in_features,
            module.window_size,
            module.shift_size,
            module.num_heads,
            module.qkv.bias is not None,
            module.proj.bias is not None,
            module.attention_dropout,
            module.dropout,
            variant=variant,
            **layer_options,
        )
        layer.load_state_dict(layer._window_state(module), strict=False)
        layer.qkv = KRLinear.from_linear(module.qkv, init_noise=init_noise, **layer_options)
        layer.proj = KRLinear.from_linear(module.proj, init_noise=init_noise, **layer_options)
        if variant == "v2":
            for i in (0, 2):
                layer.cpb_mlp[i] = KRLinear.from_linear(
                    module.cpb_mlp[i], init_noise=init_noise, **layer_options
                )
        weight = module.qkv.weight
        return layer.to(device=weight.device, dtype=weight.dtype).train(module.training)

    def to_static(self) -> nn.Module:
        """The torchvision module of the same variant (``qkv`` / ``proj``: the mean of the candidates)."""
        static = self._static_module(self.qkv.bias is not None, self.proj.bias is not None)
        weight = self.qkv.weight
        static = static.to(device=weight.device, dtype=weight.dtype).train(self.training)
        static.load_state_dict(self._window_state(self), strict=False)
        self.qkv.store_static(static.qkv)
        self.proj.store_static(static.proj)
        if self.variant == "v2":
            for i in (0, 2):
                self.cpb_mlp[i].store_static(static.cpb_mlp[i])
        return static

    def relative_position_bias(self, window: list[int], batch: int = 1) -> Tensor:
        """(1, h, N, N) for windows of size ``window``, as torchvision computes it; v2: one per
        image, (B, h, N, N), from its KR position-bias MLP."""
        if self.variant == "v2":
            coords = self.relative_coords_table.expand(batch, *self.relative_coords_table.shape[1:])
            table = self.cpb_mlp(coords).view(batch, -1, self.num_heads)  # (B, L, h)
            tokens = math.prod(window)
            index = self.relative_position_index.view(-1)
            bias = table[:, index].view(batch, tokens, tokens, self.num_heads).permute(0, 3, 1, 2)
            return 16 * torch.sigmoid(bias)
        if self.variant == "3d":
            return _relative_position_bias_3d(
                self.relative_position_bias_table, self.relative_position_index, window
            )
        return _relative_position_bias_2d(
            self.relative_position_bias_table, self.relative_position_index, window
        )

    def window_and_shift(self, size: list[int]) -> tuple[list[int], list[int]]:
        """The window and shift torchvision uses for a map of ``size``: no shift along a dimension
        the window covers (3d also shrinks the window to the map there)."""
        window, shift = list(self.window_size), list(self.shift_size)
        for i, (s, w) in enumerate(zip(size, window, strict=True)):
            if s <= w:
                shift[i] = 0
                if self.variant == "3d":
                    window[i] = s
        return window, shift

    def _projected(self, x: Tensor, padded: list[int]) -> Tensor:
        """``qkv`` of the map ``x`` (B, *S, C), padded to (B, *P, 3C) with the qkv of zero tokens."""
        qkv = self.qkv(x)
        bias = self.qkv.bias
        if bias is not None and self.variant == "v2":  # v2 zeroes the key bias at every forward
            key_bias = torch.zeros_like(bias)
            key_bias[self.dim : 2 * self.dim] = bias[self.dim : 2 * self.dim]
            qkv = qkv - key_bias
            bias = bias - key_bias
        size = list(x.shape[1:-1])
        if size == padded:
            return qkv
        if bias is None:
            canvas = qkv.new_zeros(qkv.shape[0], *padded, qkv.shape[-1])
        else:
            canvas = bias.to(qkv.dtype).expand(qkv.shape[0], *padded, qkv.shape[-1]).clone()
        canvas[(slice(None), *(slice(0, s) for s in size))] = qkv
        return canvas

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != len(self.window_size) + 2 or x.shape[-1] != self.dim:
            layout = "(B, H, W, C)" if len(self.window_size) == 2 else "(B, T, H, W, C)"
            raise ValueError(
                f"KRShiftedWindowAttention ({self.variant}) expects input of shape {layout} with "
                f"C = {self.dim}; got {tuple(x.shape)}"
            )
        size = list(x.shape[1:-1])
        window, shift = self.window_and_shift(size)
        padded = [s + (w - s % w) % w for s, w in zip(size, window, strict=True)]
        dims = tuple(range(1, len(size) + 1))

        qkv = self._projected(x, padded)  # (B, *P, 3C)
        if any(shift):
            qkv = torch.roll(qkv, shifts=[-s for s in shift], dims=dims)
        windows = _partition(qkv, window)  # (B, num_windows, N, 3C)
        batch, num_windows, tokens, _ = windows.shape
        head_dim = self.dim // self.num_heads
        q, k, v = (
            windows.view(batch, num_windows, tokens, 3, self.num_heads, head_dim)
            .permute(3, 0, 1, 4, 2, 5)
            .unbind(0)
        )  # each (B, num_windows, h, N, C/h)
        if self.variant == "v2":  # cosine attention
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
        position_bias = self.relative_position_bias(window, batch)  # (1 or B, h, N, N)
        attn = attn + position_bias.unsqueeze(1)
        if any(shift):
            attn = attn + _shift_mask(padded, window, shift, attn).unsqueeze(1)
        attn = F.dropout(F.softmax(attn, dim=-1), self.attention_dropout, self.training)

        out = (attn @ v).transpose(2, 3).reshape(batch, num_windows, tokens, self.dim)
        out = _merge(out, window, padded)  # (B, *P, C)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=dims)
        out = out[(slice(None), *(slice(0, s) for s in size))]
        return F.dropout(self.proj(out), self.dropout, self.training)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, dim={self.dim}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, num_heads={self.num_heads}"
        )
