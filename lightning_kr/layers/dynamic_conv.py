"""Convolution and linear maps with per-sample aggregated kernels, computed without the slow designs.

The aggregated kernel of sample ``b`` (ODConv, ``KR_SPEC.md``) is::

    W_b = sum_n a_kn[b, n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ W_n

Channel attention ``a_c`` is applied to the input and filter attention ``a_f`` to the output (the same
result, much cheaper). What remains per sample is ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n``; it is
needed only when there are several candidates or a spatial attention. Then one of three strategies
computes ``conv(x_b, K_b)`` for the whole batch:

* ``"shared"``: ``K_b`` is the same for every sample (n = 1 and no spatial attention): one ordinary
  convolution.
* ``"tap_scaled"``: n = 1 with spatial attention: ``a_s`` scales the im2col columns tap by tap and one
  ordinary matrix product with the static kernel follows (no per-sample kernel at all).
* ``"grouped"``: the per-sample kernels are stacked and run as one ``groups = B·g`` convolution.
* ``"folded"``: the same with channel and filter attention folded into the kernels (one tensor
  ``B × |W|`` instead of two extra activation tensors); ``"auto"`` folds where a kernel is smaller
  than the activations.
* ``"unfold"``: im2col columns and one batched matrix product with the per-sample kernels.
* ``"taps"``: a k×k convolution is the sum of k² shifted 1×1 convolutions. One matrix product of the
  channels-last input with all taps' kernels ``(B·H·W, C_in) @ (C_in, k²·C_out)`` (per sample when
  n > 1), then the k² shifted partial outputs are weighted by the spatial attention and summed.
  Exactly the convolution's multiply-adds, as one large well-shaped GEMM: the fast path for wide
  layers on small feature maps, where a grouped convolution is slowest (stride 1, groups 1).
* ``"candidate_outputs"``: no per-sample kernel at all: the im2col rows of the whole batch times all
  ``n`` candidates in one matrix product ``(B·L, C_in·k²) @ (C_in·k², n·C_out)``, the spatial
  attention on the columns, then the outputs mixed by ``a_kn``. ``n`` times the convolution's
  multiply-adds, but the cheapest form on maps with few positions (CIFAR-sized inputs), where
  mixing per-sample kernels costs more than the convolution itself; taps that only read padding
  are dropped.
* ``"reference"``: the textbook method (ODConv's code): the full per-sample kernel
  ``W_b`` (all four attentions folded in) through one ``groups = B`` convolution, for every layer:
  the benchmark's baseline, never chosen by ``"auto"``.

In training, ``"taps"``, ``"unfold"``, ``"tap_scaled"`` and ``"folded"`` run as autograd Functions
(:mod:`~lightning_kr.layers.recomputing_conv`) that keep only their inputs and the attentions for
backward and rebuild per-sample kernels, columns and partial sums there, a slice of the batch at a
time: peak training memory close to the static network's.

:func:`choose_strategy` picks by shape; every strategy computes the same function (tests assert it
against a naive per-sample reference). ``B × n × |W|`` is never materialised: the candidates are
mixed with one matrix product ``(B, n) @ (n, |W|)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kr.layers.recomputing_conv import (
    FoldedGroupedConv,
    TapsConv,
    UnfoldConv,
    tap_offsets,
    tap_windows,
)

Strategy = Literal[
    "auto",
    "shared",
    "tap_scaled",
    "grouped",
    "folded",
    "unfold",
    "taps",
    "candidate_outputs",
    "reference",
]
STRATEGIES = (
    "shared",
    "tap_scaled",
    "grouped",
    "folded",
    "unfold",
    "taps",
    "candidate_outputs",
    "reference",
)


SMALL_MAP = 256  # output positions (16 × 16) below which a grouped convolution loses to a GEMM

PER_SAMPLE_KERNEL_COST = 40
"""What writing and re-reading one element of a per-sample kernel costs, in multiply-adds of a
well-shaped matrix product, measured on CPU (``python recipes/layer_benchmark.py --scale 7 --batch
50``: ResNet-18's layers at a 32² input). The mixing product ``(B, n) @ (n, |W|)`` has an inner
dimension of ``n`` and runs at memory speed, and so does the per-sample product that reads
``B × |W|`` back when a map has few positions. It sets where ``"candidate_outputs"`` (``n·L·|W|``
multiply-adds in one large product) beats mixing the kernels
(``(n + L + 2·PER_SAMPLE_KERNEL_COST)·|W|``): at n = 4, maps of up to about 28 positions."""


def choose_strategy(
    batch: int,
    weight_shape: torch.Size,
    out_hw: tuple[int, int],
    has_kernel_att: bool,
    has_spatial_att: bool,
    stride: tuple[int, int] = (1, 1),
    groups: int = 1,
    in_hw: tuple[int, int] | None = None,
    padding: tuple[int, int] | None = None,
    dilation: tuple[int, int] = (1, 1),
) -> str:
    """Pick the fastest exact strategy for one call.

    First by counted cost, for dense convolutions (groups 1): convolving with all ``n`` candidates
    and mixing the outputs (``"candidate_outputs"``) costs ``n·L·|W_live|`` multiply-adds (``L``
    output positions, ``|W_live|`` the kernel without the taps that only read padding); mixing the
    candidates into per-sample kernels costs ``(n + L)·|W|`` plus writing and reading ``B × |W|``
    (:data:`PER_SAMPLE_KERNEL_COST`). On small maps (CIFAR-sized inputs: ResNet-18's last stages run
    on 2×2 and 1×1 maps) the first is 3–40x faster. With one candidate it is chosen where taps
    drop out and for strided convolutions on maps of up to 64 positions.

    Otherwise by shape, measured on CPU (``python recipes/layer_benchmark.py``, ResNet-18 shapes,
    batch 32): a grouped convolution with ``groups = B`` runs close to the static convolution on
    large feature maps (1.2x at 56², 64 channels) but 8–14x slower on small ones (7², 512 channels),
    where one GEMM over the taps costs 1.6x; 1×1 kernels are cheapest as one batched matrix
    product. At batch 1 the cost is the pass over the kernel that applies the spatial attention;
    where the im2col columns are less than a quarter of the kernel (7², 512 channels) they take the
    attention instead. With several candidates on the smallest maps (≤ 8², 512 channels: 3.7x vs
    4.6x static) the per-sample im2col product beats the taps, which must permute every candidate
    kernel. Where a grouped convolution's per-sample kernel is smaller than the activations it is
    ``"folded"``.

    Args:
        batch: ``B``.
        weight_shape: candidate kernels ``(n, C_out, C_in / g, kh, kw)``.
        out_hw: output spatial size ``(H', W')``.
        has_kernel_att: kernel-number attention present (n > 1).
        has_spatial_att: spatial attention present (k > 1).
        stride: convolution stride.
        groups: convolution groups.
        in_hw: input spatial size ``(H, W)`` before padding (default: ``out_hw`` times ``stride``).
        padding: ``(top, left)`` zero padding (symmetric); ``None``: every tap counts as live.
        dilation: convolution dilation.
    """
    height, width = in_hw or (out_hw[0] * stride[0], out_hw[1] * stride[1])
    if (has_kernel_att or has_spatial_att) and groups == 1:
        n, _c_out, _c_in, kh, kw = weight_shape
        live = (
            kh * kw
            if padding is None
            else len(live_taps((kh, kw), stride, padding, dilation, (height, width), out_hw))
        )
        positions = out_hw[0] * out_hw[1]
        if has_kernel_att:
            candidates = n * positions * live
            mixing = (n + positions + 2 * PER_SAMPLE_KERNEL_COST) * kh * kw
            if candidates <= mixing:
                return "candidate_outputs"
        elif live < kh * kw or (stride != (1, 1) and positions <= 64):
            # One candidate: the same multiply-adds as the per-sample im2col product, but that
            # product re-reads the kernel for every sample and has only L columns.
            return "candidate_outputs"
    strategy = _fastest(
        batch, weight_shape, out_hw, has_kernel_att, has_spatial_att, stride, groups
    )
    if strategy == "grouped":
        _n, c_out, c_in_g, kh, kw = weight_shape
        activations = c_in_g * groups * height * width + c_out * out_hw[0] * out_hw[1]
        if c_out * c_in_g * kh * kw <= activations:
            # Fold channel and filter attention into the kernel rather than into two extra
            # activation tensors (less time, less memory).
            return "folded"
    return strategy


def _fastest(
    batch: int,
    weight_shape: torch.Size,
    out_hw: tuple[int, int],
    has_kernel_att: bool,
    has_spatial_att: bool,
    stride: tuple[int, int],
    groups: int,
) -> str:
    if not has_kernel_att and not has_spatial_att:
        return "shared"
    kh, kw = weight_shape[-2:]
    if batch == 1:
        # One sample: an ordinary convolution with its aggregated kernel, unless scaling the
        # im2col columns by the spatial attention touches fewer numbers than scaling the kernel.
        c_out, c_in_g = weight_shape[1:3]
        columns = c_in_g * groups * kh * kw * out_hw[0] * out_hw[1]
        # im2col + GEMM runs slower than the library convolution: it must save a lot to win.
        kernel = c_out * c_in_g * kh * kw
        return "unfold" if has_spatial_att and 4 * columns < kernel else "grouped"
    small = out_hw[0] * out_hw[1] <= SMALL_MAP
    if kh * kw == 1:
        return "unfold" if groups == 1 else "grouped"
    if not small or groups != 1:
        return "grouped"
    if stride == (1, 1):
        return "unfold" if has_kernel_att and out_hw[0] * out_hw[1] <= 64 else "taps"
    return "unfold" if has_kernel_att else "tap_scaled"


def portable_strategy(
    has_kernel_att: bool,
    has_spatial_att: bool,
    stride: tuple[int, int] = (1, 1),
    groups: int = 1,
    kernel_size: tuple[int, int] = (3, 3),
) -> str:
    """The strategy used under ``torch.export`` (ONNX): independent of the batch size.

    ``"shared"`` where every sample has the same kernel; ``"taps"`` (one matrix product for all
    taps, then shifted sums) for stride-1, dense k×k kernels; else ``"unfold"`` (im2col columns,
    scaled by the spatial attention, and one batched matrix product with the per-sample kernels).
    """
    if not (has_kernel_att or has_spatial_att):
        return "shared"
    if stride == (1, 1) and groups == 1 and kernel_size != (1, 1):
        return "taps"
    return "unfold"


def mix_candidates(
    weight: Tensor, kernel_att: Tensor | None, spatial_att: Tensor | None, batch: int
) -> Tensor:
    """Per-sample kernels ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n``, for a kernel of any rank.

    Args:
        weight: candidates (n, C_out, C_in / g, *k), e.g. ``k = (kh, kw)`` or ``(kt, kh, kw)``.
        kernel_att: (B, n) or ``None`` (n must be 1).
        spatial_att: (B, prod(k)) or ``None`` (taps in row-major order of ``k``).
        batch: ``B``.

    Returns:
        (B, C_out, C_in / g, *k).
    """
    n, *shape = weight.shape
    if kernel_att is not None:
        kernels = (kernel_att.to(weight.dtype) @ weight.reshape(n, -1)).view(batch, *shape)
    else:
        kernels = weight[0].expand(batch, *shape)
    if spatial_att is not None:
        kernels = kernels * spatial_att.to(weight.dtype).view(batch, 1, 1, *shape[2:])
    return kernels


def fold_channel_filter(
    kernels: Tensor, channel_att: Tensor | None, filter_att: Tensor | None, groups: int
) -> Tensor:
    """``a_c[b] ⊙ a_f[b] ⊙ K_b``: channel and filter attention folded into per-sample kernels.

    Args:
        kernels: (B, C_out, C_in / g, *k), any kernel rank.
        channel_att: (B, C_in) or ``None``; filter_att: (B, C_out) or ``None``.
        groups: convolution groups (input channel of row ``o``, column ``j`` is
            ``(o // (C_out / g)) · C_in / g + j``).

    Returns:
        (B, C_out, C_in / g, *k).
    """
    batch, c_out, c_in_g, *k = kernels.shape
    taps = [1] * len(k)
    if channel_att is not None:
        per_group = channel_att.to(kernels.dtype).view(batch, groups, 1, c_in_g, *taps)
        grouped = kernels.reshape(batch, groups, c_out // groups, c_in_g, *k)
        kernels = (grouped * per_group).view(batch, c_out, c_in_g, *k)
    if filter_att is not None:
        kernels = kernels * filter_att.to(kernels.dtype).view(batch, c_out, 1, *taps)
    return kernels


def conv_output_size(
    size: int, kernel: int, stride: int, padding: tuple[int, int], dilation: int
) -> int:
    return (size + padding[0] + padding[1] - dilation * (kernel - 1) - 1) // stride + 1


def dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    *,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    spatial_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    strategy: Strategy = "auto",
) -> Tensor:
    """``y_b = a_f[b] ⊙ conv(a_c[b] ⊙ x_b, K_b) + bias`` for every sample ``b`` at once.

    Args:
        x: input (B, C_in, H, W), already padded for non-zero padding modes.
        weight: candidates (n, C_out, C_in / groups, kh, kw).
        channel_att: (B, C_in) or ``None``.
        filter_att: (B, C_out) or ``None``.
        spatial_att: (B, kh*kw) or ``None``.
        kernel_att: (B, n) or ``None`` (then n must be 1).
        bias: (C_out,) or ``None``.
        stride, dilation: per spatial dimension.
        padding: ``(top, bottom, left, right)`` zero padding.
        groups: convolution groups.
        strategy: one of :data:`STRATEGIES` or ``"auto"``.

    Returns:
        (B, C_out, H', W').
    """
    # As F.conv2d: the output in the input's memory format (the GEMM strategies produce
    # channels-last rows; models that .view() a convolution's output rely on this).
    memory_format = _memory_format(x)
    batch, c_in = x.shape[:2]
    _n, c_out, c_in_g, kh, kw = weight.shape
    top, bottom, left, right = padding
    symmetric = top == bottom and left == right
    if not symmetric:
        x = F.pad(x, (left, right, top, bottom))
        top = bottom = left = right = 0
    height, width = x.shape[-2:]
    out_h = conv_output_size(height, kh, stride[0], (top, bottom), dilation[0])
    out_w = conv_output_size(width, kw, stride[1], (left, right), dilation[1])
    exporting = torch.compiler.is_exporting()
    if exporting:
        # torch.export / ONNX: a grouped convolution bakes the batch into ``groups`` and the
        # strategy choice branches on it; the portable forms (taps GEMM, im2col) compute the same
        # function for any batch, in plain operators.
        strategy = portable_strategy(
            kernel_att is not None, spatial_att is not None, stride, groups, (kh, kw)
        )
    elif strategy == "auto":
        strategy = choose_strategy(
            batch,
            weight.shape,
            (out_h, out_w),
            kernel_att is not None,
            spatial_att is not None,
            stride,
            groups,
            (height, width),
            (top, left),
            dilation,
        )
    conv_padding = (top, left)
    # Tracers (fvcore, TorchScript, torch.export) cannot record custom autograd Functions: they
    # get the same computation in plain operators.
    recompute = not (torch.jit.is_tracing() or exporting)
    if strategy == "reference" or (strategy == "folded" and not recompute):
        return _reference_conv(
            x, weight, channel_att, filter_att, spatial_att, kernel_att, bias, stride,
            conv_padding, dilation, groups, (out_h, out_w),
        ).contiguous(memory_format=memory_format)  # fmt: skip
    if strategy == "folded":
        dtype = _compute_dtype(x)
        return FoldedGroupedConv.apply(
            x.to(dtype), weight.to(dtype), *_cast(dtype, channel_att, filter_att, spatial_att),
            *_cast(dtype, kernel_att, bias), stride, conv_padding, dilation, groups,
        ).view(batch, c_out, out_h, out_w).contiguous(memory_format=memory_format)  # fmt: skip
    if channel_att is not None:
        x = x * channel_att.to(x.dtype)[:, :, None, None]

    if strategy == "taps":
        if groups != 1 or stride != (1, 1):
            raise ValueError("strategy 'taps' needs groups = 1 and stride 1")
        y = _taps_conv(x, weight, kernel_att, spatial_att, (top, left), dilation, (out_h, out_w))
    elif strategy == "shared":
        if kernel_att is not None or spatial_att is not None:
            raise ValueError("strategy 'shared' needs n = 1 and no spatial attention")
        y = F.conv2d(x, weight[0], None, stride, conv_padding, dilation, groups)
    elif strategy == "grouped":
        kernels = mix_candidates(weight, kernel_att, spatial_att, batch)
        y = F.conv2d(
            x.reshape(1, batch * c_in, x.shape[2], x.shape[3]),
            kernels.reshape(batch * c_out, c_in_g, kh, kw),
            None,
            stride,
            conv_padding,
            dilation,
            groups * batch,
        ).view(batch, c_out, out_h, out_w)
    elif strategy == "candidate_outputs":
        y = _candidate_outputs_conv(
            x, weight, kernel_att, spatial_att, stride, conv_padding, dilation, groups,
            (out_h, out_w),
        )  # fmt: skip
    elif strategy in ("unfold", "tap_scaled"):
        if strategy == "tap_scaled" and kernel_att is not None:
            raise ValueError("strategy 'tap_scaled' needs n = 1")
        if recompute:
            dtype = _compute_dtype(x)
            y = UnfoldConv.apply(
                x.to(dtype), weight.to(dtype), *_cast(dtype, kernel_att, spatial_att), stride,
                conv_padding, dilation, groups, (out_h, out_w),
            )  # fmt: skip
        else:
            y = _unfold_conv(
                x, weight, kernel_att, spatial_att, stride, conv_padding, dilation, groups,
                (out_h, out_w),
            )  # fmt: skip
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {('auto', *STRATEGIES)}")

    if filter_att is not None:
        y = y * filter_att.to(y.dtype)[:, :, None, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y.contiguous(memory_format=memory_format)


def _memory_format(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last (and not also contiguous) input, else contiguous."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would compute a convolution in, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _cast(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _taps_conv(
    x: Tensor,
    weight: Tensor,
    kernel_att: Tensor | None,
    spatial_att: Tensor | None,
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> Tensor:
    """Stride-1, groups-1 convolution as k² shifted 1×1 convolutions from one matrix product.

    Args:
        x: (B, C_in, H, W); weight: (n, C_out, C_in, kh, kw); kernel_att: (B, n) or None;
        spatial_att: (B, kh*kw) or None; padding: (top, left) zero padding (symmetric);
        dilation: (dh, dw); out_hw: (H', W').

    Returns:
        (B, C_out, H', W').
    """
    if not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        dtype = _compute_dtype(x)
        y = TapsConv.apply(
            x.to(dtype), weight.to(dtype), *_cast(dtype, kernel_att, spatial_att), padding,
            dilation, out_hw,
        )  # fmt: skip
        return y.permute(0, 3, 1, 2)
    batch, c_in, height, width = x.shape
    n, c_out, _, kh, kw = weight.shape
    taps = kh * kw
    x_cl = x.permute(0, 2, 3, 1).reshape(batch, height * width, c_in)
    if kernel_att is None:
        kernel = weight[0].permute(1, 2, 3, 0).reshape(c_in, taps * c_out)
        partial = x_cl.reshape(-1, c_in) @ kernel.to(x_cl.dtype)
    else:
        mixed = kernel_att.to(weight.dtype) @ weight.permute(0, 2, 3, 4, 1).reshape(n, -1)
        partial = torch.bmm(x_cl, mixed.view(batch, c_in, taps * c_out).to(x_cl.dtype))
    partial = partial.view(batch, height, width, taps, c_out)
    if spatial_att is None:
        spatial_att = partial.new_ones(batch, taps)
    offsets = tap_offsets((kh, kw), padding, dilation)
    y = _shift_sum_traceable(partial, spatial_att.to(partial.dtype), offsets, out_hw)
    return y.permute(0, 3, 1, 2)


def _unfold_conv(
    x: Tensor,
    weight: Tensor,
    kernel_att: Tensor | None,
    spatial_att: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """:class:`~lightning_kr.layers.recomputing_conv.UnfoldConv` in plain operators (for tracers)."""
    batch, c_in = x.shape[:2]
    _n, c_out, c_in_g, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # (B, C_in·kh·kw, L)
    positions = cols.shape[-1]
    if spatial_att is not None:
        cols = (
            cols.view(batch, c_in, kh * kw, positions)
            * spatial_att.to(cols.dtype)[:, None, :, None]
        )
    cols = cols.reshape(batch, groups, c_in_g * kh * kw, positions)
    if kernel_att is None:
        kernel = weight[0].reshape(groups, c_out // groups, c_in_g * kh * kw)
    else:
        kernel = mix_candidates(weight, kernel_att, None, batch).reshape(
            batch, groups, c_out // groups, c_in_g * kh * kw
        )
    return torch.matmul(kernel.to(cols.dtype), cols).view(batch, c_out, *out_hw)


def live_taps(
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> list[int]:
    """Indices ``u·kw + v`` of the taps that read the input at some output position (on a map
    smaller than the kernel's reach, the others only ever read zero padding)."""

    def live(k: int, s: int, p: int, d: int, size: int, out: int) -> list[int]:
        return [u for u in range(k) if any(0 <= i * s + u * d - p < size for i in range(out))]

    rows = live(kernel_size[0], stride[0], padding[0], dilation[0], in_hw[0], out_hw[0])
    cols = live(kernel_size[1], stride[1], padding[1], dilation[1], in_hw[1], out_hw[1])
    return [u * kernel_size[1] + v for u in rows for v in cols]


def _candidate_outputs_conv(
    x: Tensor,
    weight: Tensor,
    kernel_att: Tensor | None,
    spatial_att: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """Convolve with all ``n`` candidates at once and mix the outputs: no per-sample kernel.

    ``y_b = sum_n a_kn[b, n] · (W_n @ (a_s[b] ⊙ unfold(x_b)))``: one matrix product
    ``(B·L, C_in·T) @ (C_in·T, n·C_out)`` over the im2col rows of the whole batch, then a weighted
    sum over ``n``. It costs ``n`` times the convolution's multiply-adds but never writes the
    ``B × |W|`` per-sample kernels: the cheapest exact form where the map has few positions ``L``
    (``n·L·|W|`` against ``(n + L)·|W|`` plus a pass over ``B × |W|``). Taps that only read padding
    are dropped.

    Args:
        x: (B, C_in, H, W), channel attention applied; weight: (n, C_out, C_in / g, kh, kw);
        kernel_att: (B, n) or None; spatial_att: (B, kh·kw) or None; padding: (top, left),
        symmetric; out_hw: (H', W').

    Returns:
        (B, C_out, H', W').
    """
    batch, c_in, height, width = x.shape
    n, c_out, c_in_g, kh, kw = weight.shape
    positions = out_hw[0] * out_hw[1]
    if torch.jit.is_tracing():
        # Counted (fvcore traces) by the convention of static convolutions, padding taps included,
        # so that KR and its static model are compared on one count.
        taps = list(range(kh * kw))
    else:
        taps = live_taps((kh, kw), stride, padding, dilation, (height, width), out_hw)
    cols = F.unfold(x, (kh, kw), dilation, padding, stride).view(batch, c_in, kh * kw, positions)
    kernels = weight.reshape(n, groups, c_out // groups, c_in_g, kh * kw)
    if len(taps) < kh * kw:
        index = torch.tensor(taps, dtype=torch.long, device=x.device)
        cols = cols.index_select(2, index)
        kernels = kernels.index_select(4, index)
        if spatial_att is not None:
            spatial_att = spatial_att.index_select(1, index)
    if spatial_att is not None:
        cols = cols * spatial_att.to(cols.dtype)[:, None, :, None]
    live = len(taps)
    # Rows of the whole batch: (g, B·L, C_in/g·T') @ (g, C_in/g·T', n·C_out/g).
    rows = cols.view(batch, groups, c_in_g * live, positions).permute(1, 0, 3, 2)
    rows = rows.reshape(groups, batch * positions, c_in_g * live)
    kernels = kernels.permute(1, 3, 4, 0, 2).reshape(groups, c_in_g * live, n * (c_out // groups))
    outputs = torch.matmul(rows, kernels.to(rows.dtype))  # (g, B·L, n·C_out/g)
    outputs = outputs.view(groups, batch, positions, n, c_out // groups)
    if kernel_att is None:
        mixed = outputs.sum(3) if n > 1 else outputs[:, :, :, 0]
    else:
        mixed = torch.einsum("gblnc,bn->bgcl", outputs, kernel_att.to(outputs.dtype))
        return mixed.reshape(batch, c_out, *out_hw)
    return mixed.permute(1, 0, 3, 2).reshape(batch, c_out, *out_hw)


def _shift_sum_traceable(
    partial: Tensor, att: Tensor, offsets: list[tuple[int, int]], out_hw: tuple[int, int]
) -> Tensor:
    """The shifted, weighted tap sum of :class:`~lightning_kr.layers.recomputing_conv.TapsConv` in
    out-of-place operators: partial (B, H, W, T, C), att (B, T) → (B, H', W', C)."""
    batch, height, width, _, _ = partial.shape
    out_h, out_w = out_hw
    y = None
    for t, offset in enumerate(offsets):
        window = tap_windows(offset, (height, width), out_hw)
        if window is None:
            continue
        oi, oj, ii, ij = window
        term = partial[:, ii, ij, t] * att[:, t].view(batch, 1, 1, 1)
        term = F.pad(term, (0, 0, oj.start, out_w - oj.stop, oi.start, out_h - oi.stop))
        y = term if y is None else y + term
    if y is None:
        y = partial.new_zeros(batch, out_h, out_w, partial.shape[-1])
    return y


def _reference_conv(
    x: Tensor,
    weight: Tensor,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    spatial_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """The textbook method: full per-sample kernels ``W_b`` and one ``groups = B·g`` convolution.

    Shapes as :func:`dynamic_conv2d`; ``x`` is the raw input (channel attention not yet applied).
    """
    batch, c_in = x.shape[:2]
    _n, c_out, c_in_g, kh, kw = weight.shape
    kernels = fold_channel_filter(
        mix_candidates(weight, kernel_att, spatial_att, batch), channel_att, filter_att, groups
    )
    y = F.conv2d(
        x.reshape(1, batch * c_in, x.shape[2], x.shape[3]),
        kernels.reshape(batch * c_out, c_in_g, kh, kw),
        None if bias is None else bias.repeat(batch),
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return y.view(batch, c_out, *out_hw)


def dynamic_linear(
    x: Tensor,
    weight: Tensor,
    *,
    channel_att: Tensor | None,
    filter_att: Tensor | None,
    kernel_att: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """``y_b = a_f[b] ⊙ (K_b (a_c[b] ⊙ x_b)) + bias`` with ``K_b = sum_n a_kn[b, n] W_n``.

    Args:
        x: (B, N, C_in) tokens (N = 1 for plain vectors).
        weight: candidates (n, C_out, C_in).
        channel_att: (B, C_in) or ``None``; filter_att: (B, C_out) or ``None``;
        kernel_att: (B, n) or ``None`` (then n must be 1); bias: (C_out,) or ``None``.

    Returns:
        (B, N, C_out).
    """
    batch, tokens, c_in = x.shape
    n, c_out, _ = weight.shape
    if channel_att is not None:
        x = x * channel_att.to(x.dtype)[:, None, :]
    if kernel_att is None:
        y = F.linear(x, weight[0])
    elif tokens < n:
        # Few tokens: mixing outputs (N·n·|W|) is cheaper than mixing kernels ((n + N)·|W|).
        y_all = F.linear(x, weight.reshape(n * c_out, c_in)).view(batch, tokens, n, c_out)
        y = torch.einsum("btnc,bn->btc", y_all, kernel_att.to(y_all.dtype))
    else:
        kernels = (kernel_att.to(weight.dtype) @ weight.reshape(n, -1)).view(batch, c_out, c_in)
        y = torch.bmm(x, kernels.transpose(1, 2).to(x.dtype))
    if filter_att is not None:
        y = y * filter_att.to(y.dtype)[:, None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
