"""PatchDynamicConv2d: a convolution whose kernel is predicted for every patch by HybridDense stacks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lightning_kr.patch.hybrid_dense import (
    HybridDense,
    HybridVariant,
    hybrid_activation,
    hybrid_activation_dot,
)


class PatchDynamicConv2d(nn.Module):
    """Convolution with a kernel predicted from each ``C×k×k`` patch, plus a static ``similar_conv``.

    For every output location with patch ``x`` (flattened, ``P = C·kh·kw`` values in
    ``F.unfold`` / conv-weight order ``(c, i, j)``) and every output channel ``o``, predictor ``o``
    is a HybridDense stack followed by a linear kernel head ``A_o`` (``P × h``)::

        u_o = HD_o,n(... HD_o,1(x))          hidden features, (h,)
        kernel_o = A_o u_o                   the predicted kernel, (P,) = (C, kh, kw)
        y_o = kernel_o · x + similar_conv(x)_o

    Nothing of size ``B × L × out × P`` is built. The first HybridDense layer of every predictor is
    linear in the patch, ``W_o x + b_o``, i.e. a convolution; so is ``x^T A_o`` in
    ``kernel_o · x = (x^T A_o) u_o``; so is ``similar_conv``. One ``F.conv2d`` call computes all
    three for all ``out`` predictors; deeper HybridDense layers are grouped 1×1 convolutions
    (``groups=out``); the activations run on ``(B, out, h, H', W')``; and
    ``y_o = sum_j (x^T A_o)_j u_o,j`` is one multiply-and-sum over ``h``, fused with the last
    activation (:func:`hybrid_activation_dot`). The largest tensor is
    the convolution's output, ``(B, out·(h1 + hn + 1), H', W')``, against ``(B, H'·W', out, P)``
    for explicit kernels. Patches come from the convolution itself, so they never mix
    neighbouring locations. :meth:`predict_kernels` builds the kernels explicitly, for inspection.

    With a linear kernel head the output is bilinear in the patch (kernel and patch both grow
    with it): keep learning rates moderate or clip gradients.

    The kernel head has no bias: a bias ``c_o`` would add ``c_o · x``, which *is* a static
    convolution, i.e. ``similar_conv``. The predictors' hidden layers are HybridDense (the
    preprint's released code put BatchNorm between them; here there is none).

    Args:
        in_channels: ``C``, channels of the input.
        out_channels: number of output channels, one kernel predictor each.
        kernel_size: ``k`` or ``(kh, kw)``, the patch (and kernel) size.
        stride: stride of the patch grid.
        padding: zero padding on each side, as in ``nn.Conv2d``.
        hidden: width ``h`` of the predictors' HybridDense layer, or a sequence of widths for a
            deeper stack (e.g. ``(16, 16)``).
        kernel_head_gain: the kernel head starts as ``U(-a, a)`` with ``a = gain / sqrt(h · P)``;
            0 makes the layer start as its ``similar_conv``.
        eps: HybridDense ``eps`` of every predictor layer.
        power_range: HybridDense ``(p_min, p_max)``.
        power_init: HybridDense initial power (1: the predictors start linear).
        variant: HybridDense ``"signed"`` (default) or the preprint's ``"relu"`` reading.

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: ``(B, out, H', W')`` with ``H' = (H + 2·pad - kh) // stride + 1`` (same for W).

    Example::

        >>> conv = PatchDynamicConv2d(3, 4, kernel_size=8, stride=8, hidden=16)
        >>> conv(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        hidden: int | Sequence[int] = 16,
        *,
        kernel_head_gain: float = 1.0,
        eps: float = 1e-3,
        power_range: tuple[float, float] = (0.5, 3.0),
        power_init: float = 1.0,
        variant: HybridVariant = "signed",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must be a positive width or widths, got {hidden!r}.")
        self.patch_features = in_channels * self.kernel_size[0] * self.kernel_size[1]
        widths = (self.patch_features, *self.hidden)
        self.predictor_layers = nn.ModuleList(
            HybridDense(
                w_in,
                w_out,
                num_predictors=out_channels,
                eps=eps,
                power_range=power_range,
                power_init=power_init,
                variant=variant,
            )
            for w_in, w_out in pairwise(widths)
        )
        self.kernel_head = nn.Parameter(
            torch.empty(out_channels, self.patch_features, self.hidden[-1])
        )
        self.similar_conv = nn.Conv2d(
            in_channels, out_channels, self.kernel_size, stride=self.stride, padding=self.padding
        )
        self.kernel_head_gain = kernel_head_gain
        self.reset_kernel_head()

    def reset_kernel_head(self) -> None:
        """Initialise ``A`` as ``U(-a, a)``, ``a = kernel_head_gain / sqrt(h · P)``."""
        bound = self.kernel_head_gain / math.sqrt(self.hidden[-1] * self.patch_features)
        nn.init.uniform_(self.kernel_head, -bound, bound)

    def _conv_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """Stack ``[W_1 (out·h1), (A·s_n)^T (out·hn), similar_conv (out)]`` as one conv weight.

        The last HybridDense scale ``s_n`` multiplies ``u`` just before ``A``, so it is folded into
        ``A`` here (same function, same gradients, one pass less over the largest tensor).

        Returns:
            ``weight`` of shape ``(out·(h1 + hn + 1), C, kh, kw)`` and ``bias`` of shape
            ``(out·(h1 + hn + 1),)``.
        """
        first, last = self.predictor_layers[0], self.predictor_layers[-1]
        kernel_shape = (self.in_channels, *self.kernel_size)
        scaled_head = self.kernel_head * last.scale.unsqueeze(1)
        weight = torch.cat(
            [
                first.weight.reshape(-1, *kernel_shape),
                scaled_head.transpose(1, 2).reshape(-1, *kernel_shape),
                self.similar_conv.weight,
            ]
        )
        bias = torch.cat(
            [
                first.bias.reshape(-1),
                first.bias.new_zeros(self.out_channels * self.hidden[-1]),
                self.similar_conv.bias,
            ]
        )
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, out, H', W')``."""
        weight, bias = self._conv_weight_and_bias()
        convolved = F.conv2d(x, weight, bias, self.stride, self.padding)
        batch, _, out_h, out_w = convolved.shape
        groups, widths = self.out_channels, self.hidden
        pre_activation, projection, static = convolved.split(
            [groups * widths[0], groups * widths[-1], groups], dim=1
        )
        hidden = pre_activation.view(batch, groups, widths[0], out_h, out_w)
        for index, layer in enumerate(self.predictor_layers):
            if index > 0:
                weight = layer.weight.reshape(-1, layer.in_features, 1, 1)
                hidden = F.conv2d(
                    hidden.flatten(1, 2), weight, layer.bias.reshape(-1), groups=groups
                )
                hidden = hidden.view(batch, groups, layer.out_features, out_h, out_w)
            if index < len(self.predictor_layers) - 1:
                hidden = hybrid_activation(
                    hidden,
                    layer.scale[..., None, None],
                    layer.power[..., None, None],
                    layer.eps,
                    layer.variant,
                )
        last = self.predictor_layers[-1]
        projection = projection.view(batch, groups, widths[-1], out_h, out_w)
        dynamic = hybrid_activation_dot(
            hidden, projection, last.power[..., None, None], last.eps, last.variant, dim=2
        )
        return dynamic + static

    def predict_kernels(self, x: Tensor) -> Tensor:
        """The per-patch kernels, materialised (for inspection; ``forward`` never builds them).

        Args:
            x: input of shape ``(B, C, H, W)``.

        Returns:
            Tensor ``(B, H', W', out, C, kh, kw)``: the kernel predictor ``o`` gives at each location.
        """
        out_h, out_w = self.output_size(x.shape[-2:])
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        patches = patches.transpose(1, 2).reshape(x.shape[0], out_h, out_w, 1, self.patch_features)
        hidden = patches.expand(-1, -1, -1, self.out_channels, -1)
        for layer in self.predictor_layers:
            hidden = layer(hidden)
        kernels = torch.einsum("bxygh,gph->bxygp", hidden, self.kernel_head)
        return kernels.unflatten(-1, (self.in_channels, *self.kernel_size))

    def output_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """``(H', W')`` for an input of spatial size ``(H, W)``."""
        return tuple(
            (size + 2 * pad - kernel) // step + 1
            for size, pad, kernel, step in zip(
                input_size, self.padding, self.kernel_size, self.stride, strict=True
            )
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, hidden={self.hidden}"
        )
