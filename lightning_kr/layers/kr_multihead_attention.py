"""``KRMultiheadAttention``: self-attention whose input and output projections are KR layers.

torchvision's ViT keeps the attention input projection of :class:`torch.nn.MultiheadAttention` as a
raw parameter (``in_proj_weight``) consumed by a functional call, so replacing ``Linear`` modules alone
cannot reach it. This module is a drop-in replacement for ``nn.MultiheadAttention`` used as
self-attention (``query is key is value``): the packed q/k/v projection and the output projection
become two :class:`KRLinear` layers (two links of the ``d`` chain, in that order) and attention itself
runs through :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kr.layers.kr_linear import KRLinear


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """nn.MultiheadAttention's masks (True / -inf = not allowed) as one additive (B, h, L, S) mask."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        m = m.view(1, 1, q_len, k_len) if m.dim() == 2 else m.view(batch, heads, q_len, k_len)
        mask = m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros_like(k, dtype=dtype).masked_fill(k, float("-inf"))
        k = k.to(dtype).view(batch, 1, 1, k_len)
        mask = k if mask is None else mask + k
    return mask


class KRMultiheadAttention(nn.Module):
    """Self-attention with KR projections, call-compatible with ``nn.MultiheadAttention``.

    Args:
        embed_dim, num_heads, dropout, bias, batch_first: as in ``nn.MultiheadAttention``.
        **kr_options: forwarded to both :class:`KRLinear` projections.

    Shapes (``batch_first=True``): query = key = value (B, N, E) → (B, N, E) and the attention weights
    (B, N, N) averaged over heads (or (B, h, N, N)) when ``need_weights``, else ``None``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        **kr_options,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.in_proj = KRLinear(embed_dim, 3 * embed_dim, bias, **kr_options)
        self.out_proj = KRLinear(embed_dim, embed_dim, bias, **kr_options)

    @classmethod
    def from_mha(
        cls, mha: nn.MultiheadAttention, *, init_noise: float = 0.1, **kr_options
    ) -> KRMultiheadAttention:
        """Replace ``mha`` (packed projection, no ``bias_k``/``bias_v``, no ``add_zero_attn``)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "KRMultiheadAttention supports nn.MultiheadAttention with kdim = vdim = embed_dim, "
                "no add_bias_kv and no add_zero_attn"
            )
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            mha.in_proj_bias is not None,
            mha.batch_first,
            **kr_options,
        )
        in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, mha.in_proj_bias is not None)
        with torch.no_grad():
            in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                in_proj.bias.copy_(mha.in_proj_bias)
        layer.in_proj = KRLinear.from_linear(in_proj, init_noise=init_noise, **kr_options)
        layer.out_proj = KRLinear.from_linear(mha.out_proj, init_noise=init_noise, **kr_options)
        return layer.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)

    def to_static(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` of the same shape (weights: the mean of the candidates)."""
        has_bias = self.in_proj.bias is not None
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, has_bias, batch_first=self.batch_first
        ).to(device=self.in_proj.weight.device, dtype=self.in_proj.weight.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(self.in_proj.static_weight())
            mha.out_proj.weight.copy_(self.out_proj.static_weight())
            if has_bias:
                mha.in_proj_bias.copy_(self.in_proj.bias)
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not (query is key and key is value):
            raise ValueError(
                "KRMultiheadAttention supports self-attention only (query is key is value); "
                "exclude this module from kr_convert to keep it static"
            )
        x = query if self.batch_first else query.transpose(0, 1)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"KRMultiheadAttention expects input of shape (B, N, {self.embed_dim}) "
                f"(batch_first={self.batch_first}); got {tuple(query.shape)}"
            )
        batch, tokens, _ = x.shape
        q, k, v = (
            self.in_proj(x)
            .view(batch, tokens, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )  # each (B, h, N, hd)
        mask = _additive_mask(
            attn_mask, key_padding_mask, batch, self.num_heads, tokens, tokens, q.dtype
        )
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            if is_causal and mask is None:
                causal = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            attended = F.dropout(weights, dropout_p, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and mask is None
            )
        out = self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
