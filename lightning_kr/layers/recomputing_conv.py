"""Per-sample-kernel convolutions that keep only their inputs for backward.

Plain autograd through the fast strategies of :mod:`~lightning_kr.layers.dynamic_conv` keeps what
each step produced: the per-sample kernels (``B × |W|``, 302 MB for one ResNet-18 ``layer4``
convolution at batch 32 with four candidates), the k² tap partial sums (9 × the output), the
im2col columns, and every intermediate of a kernel built by successive attention products. These
autograd Functions save the input, the candidates and the attentions only (what a static
convolution saves, plus a few vectors) and recompute the rest in backward, a slice of the batch at
a time, so that no transient tensor is much larger than :data:`CHUNK_BYTES`.

* :class:`TapsConv` — stride 1, groups 1: one matrix product of the channels-last input with all
  taps' kernels, then the k² shifted partial outputs weighted by the spatial attention and summed.
* :class:`UnfoldConv` — im2col columns (scaled tap by tap by the spatial attention) and one matrix
  product with the (per-sample or shared) kernel: strided and 1×1 convolutions on small maps.
* :class:`FoldedGroupedConv` — the full per-sample kernel ``W_b`` (all four attentions folded in)
  through one ``groups = B·g`` convolution; chosen where ``W_b`` is smaller than the activations.

Notation: ``M_b = sum_n a_kn[b, n] W_n`` (or ``W_0`` when n = 1) is the mixed kernel of sample ``b``.
In backward, the per-sample kernel gradient ``G_b`` (from one batched matrix product or the grouped
convolution's weight gradient) gives every other gradient:
``dW_n = sum_b a_kn[b, n] G_b``, ``da_kn[b, n] = <G_b, W_n>``, and the attentions' gradients are
contractions of ``G_b ⊙ M_b``. These Functions are differentiable once (no double backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 32 * 2**20
"""Largest transient tensor (bytes) a chunk of the batch may create; 32 MiB is also glibc's largest
``mmap`` threshold, below which freed blocks are reused instead of returned to the OS."""


def batch_chunks(batch: int, per_sample_elements: int, element_size: int) -> list[slice]:
    """Slices of the batch whose transient tensors stay within :data:`CHUNK_BYTES`."""
    size = max(1, min(batch, CHUNK_BYTES // max(1, per_sample_elements * element_size)))
    return [slice(start, min(batch, start + size)) for start in range(0, batch, size)]


def tap_offsets(
    kernel_size: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> list[tuple[int, int]]:
    """Input offset ``(du, dv)`` of each tap: output (i, j) reads input (i + du, j + dv)."""
    kh, kw = kernel_size
    return [
        (u * dilation[0] - padding[0], v * dilation[1] - padding[1])
        for u in range(kh)
        for v in range(kw)
    ]


def tap_windows(
    offset: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[slice, slice, slice, slice] | None:
    """Output rows/cols of one tap and the input rows/cols they read; ``None`` when the tap never
    lands inside the input."""
    (du, dv), (height, width), (out_h, out_w) = offset, in_hw, out_hw
    i0, i1 = max(0, -du), min(out_h, height - du)
    j0, j1 = max(0, -dv), min(out_w, width - dv)
    if i0 >= i1 or j0 >= j1:
        return None
    return slice(i0, i1), slice(j0, j1), slice(i0 + du, i1 + du), slice(j0 + dv, j1 + dv)


def _channels_last_rows(x: Tensor) -> Tensor:
    """(c, C, H, W) → (c, H·W, C)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2] * x.shape[3], x.shape[1])


class TapsConv(torch.autograd.Function):
    """``y[b, i, j] = sum_t a_s[b, t] · (x_b[i + du_t, j + dv_t] @ M_b[:, t])``, stride 1, groups 1.

    Shapes: x (B, C_in, H, W) with channel attention applied; weight (n, C_out, C_in, kh, kw);
    kernel_att (B, n) or None (n = 1); spatial_att (B, kh·kw) or None; padding (top, left), symmetric;
    dilation (dh, dw); out_hw (H', W') → y (B, H', W', C_out), channels last.
    """

    @staticmethod
    def forward(ctx, x, weight, kernel_att, spatial_att, padding, dilation, out_hw):  # type: ignore[override]
        batch, c_in, height, width = x.shape
        n, c_out, _, kh, kw = weight.shape
        taps = kh * kw
        offsets = tap_offsets((kh, kw), padding, dilation)
        kernels = weight.permute(0, 2, 3, 4, 1).reshape(n, c_in * taps * c_out)  # (c_in, t, c_out)
        per_sample = height * width * taps * c_out + (0 if kernel_att is None else kernels.shape[1])
        y = x.new_zeros(batch, *out_hw, c_out)
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            rows = _channels_last_rows(x[chunk])
            count = rows.shape[0]
            if kernel_att is None:
                partial = rows.reshape(-1, c_in) @ kernels.view(c_in, taps * c_out)
            else:
                mixed = (kernel_att[chunk] @ kernels).view(count, c_in, taps * c_out)
                partial = torch.bmm(rows, mixed)
            partial = partial.view(count, height, width, taps, c_out)
            att = None if spatial_att is None else spatial_att[chunk]
            out = y[chunk]
            for t, offset in enumerate(offsets):
                window = tap_windows(offset, (height, width), out_hw)
                if window is None:
                    continue
                oi, oj, ii, ij = window
                if att is None:
                    out[:, oi, oj].add_(partial[:, ii, ij, t])
                else:
                    out[:, oi, oj].addcmul_(partial[:, ii, ij, t], att[:, t].view(count, 1, 1, 1))
        ctx.save_for_backward(x, weight, kernel_att, spatial_att)
        ctx.offsets, ctx.out_hw = offsets, out_hw
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, kernel_att, spatial_att = ctx.saved_tensors
        need_x, need_w, need_kernel, need_spatial = ctx.needs_input_grad[:4]
        batch, c_in, height, width = x.shape
        n, c_out, _, kh, kw = weight.shape
        taps = kh * kw
        kernels = weight.permute(0, 2, 3, 4, 1).reshape(n, c_in * taps * c_out)
        grad_x = x.new_empty(batch, height, width, c_in) if need_x else None
        grad_k = torch.zeros_like(kernels) if need_w and kernel_att is not None else None
        grad_tap = x.new_zeros(taps, c_out, c_in) if need_w and kernel_att is None else None
        grad_kernel_att = torch.empty_like(kernel_att) if need_kernel else None
        grad_spatial = torch.empty_like(spatial_att) if need_spatial else None
        if kernel_att is None:  # per-tap input gradients (T, c·H·W, C_in)
            per_sample = height * width * taps * (c_out + c_in)
        else:  # the mixed kernels and their gradients
            per_sample = height * width * taps * c_out + 2 * kernels.shape[1]
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            rows = _channels_last_rows(x[chunk])
            count = rows.shape[0]
            # Adjoint of the shifted sum (before the spatial weights): (c, H, W, T, C_out).
            shifted = grad_y.new_zeros(count, height, width, taps, c_out)
            g = grad_y[chunk]
            for t, offset in enumerate(ctx.offsets):
                window = tap_windows(offset, (height, width), ctx.out_hw)
                if window is not None:
                    oi, oj, ii, ij = window
                    shifted[:, ii, ij, t] = g[:, oi, oj]
            att = None if spatial_att is None else spatial_att[chunk]
            if kernel_att is None:
                by_tap = shifted.view(count * height * width, taps, c_out).transpose(0, 1)
                kernel = kernels.view(c_in, taps, c_out)
                if need_x or need_spatial:
                    grad_rows_by_tap = torch.bmm(by_tap, kernel.permute(1, 2, 0)).view(
                        taps, count, height * width, c_in
                    )
                    # (c, T, H·W·C_in) views of the per-tap input gradients: no copies.
                    per_sample = grad_rows_by_tap.view(taps, count, -1).transpose(0, 1)
                    if need_spatial:
                        grad_spatial[chunk] = torch.bmm(
                            per_sample, rows.reshape(count, -1, 1)
                        ).view(count, taps)
                    if need_x:
                        grad_rows = (
                            grad_rows_by_tap.sum(0)
                            if att is None
                            else torch.bmm(att.view(count, 1, taps), per_sample)
                        )
                        grad_x[chunk] = grad_rows.view(count, height, width, c_in)
                if need_w:
                    if att is not None:
                        shifted.mul_(att.view(count, 1, 1, taps, 1))
                    # (T, C_out, C_in): the kernel's own layout but for the tap axis.
                    grad_tap.add_(torch.matmul(by_tap.transpose(1, 2), rows.reshape(-1, c_in)))
                continue
            mixed = (kernel_att[chunk] @ kernels).view(count, c_in, taps * c_out)
            grad_mixed = torch.bmm(rows.transpose(1, 2), shifted.view(count, -1, taps * c_out))
            if att is not None:
                by_tap = grad_mixed.view(count, c_in, taps, c_out)
                if need_spatial:
                    grad_spatial[chunk] = (by_tap * mixed.view(count, c_in, taps, c_out)).sum(
                        (1, 3)
                    )
                by_tap.mul_(att.view(count, 1, taps, 1))
                shifted.mul_(att.view(count, 1, 1, taps, 1))
            grad_mixed = grad_mixed.view(count, -1)
            if need_w:
                grad_k.addmm_(kernel_att[chunk].t(), grad_mixed)
            if need_kernel:
                grad_kernel_att[chunk] = grad_mixed @ kernels.t()
            if need_x:
                grad_rows = torch.bmm(shifted.view(count, -1, taps * c_out), mixed.transpose(1, 2))
                grad_x[chunk] = grad_rows.view(count, height, width, c_in)
        grad_weight = None
        if grad_tap is not None:
            grad_weight = grad_tap.permute(1, 2, 0).reshape(1, c_out, c_in, kh, kw)
        elif grad_k is not None:
            grad_weight = grad_k.view(n, c_in, kh, kw, c_out).permute(0, 4, 1, 2, 3).contiguous()
        if grad_x is not None:
            grad_x = grad_x.permute(0, 3, 1, 2)
        return grad_x, grad_weight, grad_kernel_att, grad_spatial, None, None, None


class UnfoldConv(torch.autograd.Function):
    """``y_b = M_b @ (a_s[b] ⊙ unfold(x_b))`` per group: any stride, dilation and groups.

    Shapes: x (B, C_in, H, W) with channel attention applied; weight (n, C_out, C_in / g, kh, kw);
    kernel_att (B, n) or None (n = 1); spatial_att (B, kh·kw) or None; stride, dilation (2,);
    padding (top, left), symmetric; groups g; out_hw (H', W') → y (B, C_out, H', W').
    """

    @staticmethod
    def forward(ctx, x, weight, kernel_att, spatial_att, stride, padding, dilation, groups, out_hw):  # type: ignore[override]
        batch, c_in = x.shape[:2]
        n, c_out, c_in_g, kh, kw = weight.shape
        taps, positions = kh * kw, out_hw[0] * out_hw[1]
        kernels = weight.reshape(n, -1)
        per_sample = c_in * taps * positions + (0 if kernel_att is None else kernels.shape[1])
        # Allocated in the output's shape and returned as is: a view returned by a custom Function
        # could not be modified in place by the next layer (ReLU(inplace=True)).
        y = x.new_empty(batch, c_out, *out_hw)
        y_flat = y.view(batch, c_out, positions)
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            cols = _scaled_columns(
                x[chunk], spatial_att, chunk, (kh, kw), dilation, padding, stride
            )
            count = cols.shape[0]
            cols = cols.view(count, groups, c_in_g * taps, positions)
            if kernel_att is None:
                kernel = kernels.view(groups, c_out // groups, c_in_g * taps)
            else:
                kernel = (kernel_att[chunk] @ kernels).view(
                    count, groups, c_out // groups, c_in_g * taps
                )
            y_flat[chunk] = torch.matmul(kernel, cols).view(count, c_out, positions)
        ctx.save_for_backward(x, weight, kernel_att, spatial_att)
        ctx.conv = (stride, padding, dilation, groups, out_hw)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, kernel_att, spatial_att = ctx.saved_tensors
        stride, padding, dilation, groups, out_hw = ctx.conv
        need_x, need_w, need_kernel, need_spatial = ctx.needs_input_grad[:4]
        batch, c_in, height, width = x.shape
        n, c_out, c_in_g, kh, kw = weight.shape
        taps, positions = kh * kw, out_hw[0] * out_hw[1]
        kernels = weight.reshape(n, -1)
        grad_y = grad_y.reshape(batch, groups, c_out // groups, positions)
        grad_x = torch.empty_like(x) if need_x else None
        grad_k = torch.zeros_like(kernels) if need_w else None
        grad_kernel_att = torch.empty_like(kernel_att) if need_kernel else None
        grad_spatial = torch.empty_like(spatial_att) if need_spatial else None
        per_sample = 2 * c_in * taps * positions + (
            0 if kernel_att is None else 2 * kernels.shape[1]
        )
        for chunk in batch_chunks(batch, per_sample, x.element_size()):
            cols = F.unfold(x[chunk], (kh, kw), dilation, padding, stride)  # (c, C_in·T, L)
            count = cols.shape[0]
            g = grad_y[chunk]
            if kernel_att is None:
                kernel = kernels.view(groups, c_out // groups, c_in_g * taps)
            else:
                kernel = (kernel_att[chunk] @ kernels).view(
                    count, groups, c_out // groups, c_in_g * taps
                )
            att = None if spatial_att is None else spatial_att[chunk].view(count, 1, taps, 1)
            if need_x or need_spatial:
                grad_cols = torch.matmul(kernel.transpose(-1, -2), g).view(
                    count, c_in, taps, positions
                )
                if need_spatial:
                    grad_spatial[chunk] = (grad_cols * cols.view(count, c_in, taps, positions)).sum(
                        (1, 3)
                    )
                if need_x:
                    if att is not None:
                        grad_cols.mul_(att)
                    grad_x[chunk] = F.fold(
                        grad_cols.view(count, c_in * taps, positions),
                        (height, width),
                        (kh, kw),
                        dilation,
                        padding,
                        stride,
                    )
            if not (need_w or need_kernel):
                continue
            if att is not None:
                cols.view(count, c_in, taps, positions).mul_(att)
            cols = cols.view(count, groups, c_in_g * taps, positions)
            if kernel_att is None:
                grad_k.view(groups, c_out // groups, c_in_g * taps).add_(
                    torch.einsum("bgol,bgkl->gok", g, cols)
                )
                continue
            grad_mixed = torch.matmul(g, cols.transpose(-1, -2)).view(count, -1)
            if need_w:
                grad_k.addmm_(kernel_att[chunk].t(), grad_mixed)
            if need_kernel:
                grad_kernel_att[chunk] = grad_mixed @ kernels.t()
        grad_weight = grad_k.view_as(weight) if need_w else None
        return grad_x, grad_weight, grad_kernel_att, grad_spatial, None, None, None, None, None


def _scaled_columns(
    x: Tensor,
    spatial_att: Tensor | None,
    chunk: slice,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
) -> Tensor:
    """im2col columns (c, C_in·T, L) of ``x`` (c, C_in, H, W), scaled tap by tap by ``a_s``."""
    cols = F.unfold(x, kernel_size, dilation, padding, stride)
    if spatial_att is not None:
        count, rows, positions = cols.shape
        taps = kernel_size[0] * kernel_size[1]
        cols.view(count, rows // taps, taps, positions).mul_(
            spatial_att[chunk].view(count, 1, taps, 1)
        )
    return cols


class FoldedGroupedConv(torch.autograd.Function):
    """``y_b = conv(x_b, W_b) + bias`` with ``W_b = a_f ⊙ a_c ⊙ a_s ⊙ M_b`` through one
    ``groups = B·g`` convolution; ``W_b`` is rebuilt in backward rather than kept.

    The attentions act as a row scale ``r_b[o, c] = a_f[b, o] · a_c[b, c]`` (small) times a tap scale
    ``a_s[b, t]``; their gradients are batched matrix-vector products with ``E_b = G_b ⊙ M_b``
    (``G_b``: gradient of ``W_b``), so backward makes few passes over ``B × |W|``.

    Shapes: x (B, C_in, H, W) raw (no attention applied); weight (n, C_out, C_in / g, kh, kw);
    channel_att (B, C_in), filter_att (B, C_out), spatial_att (B, kh·kw), kernel_att (B, n), each or
    None; bias (C_out,) or None; stride, padding (top, left), dilation (2,); groups g
    → y (1, B·C_out, H', W'), the grouped convolution's own output: the caller views it as
    (B, C_out, H', W') (a view returned by a custom Function could not be modified in place by the
    next layer, e.g. ``ReLU(inplace=True)``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight, channel_att, filter_att, spatial_att, kernel_att, bias, stride, padding,
        dilation, groups,
    ):  # fmt: skip
        batch, c_in, height, width = x.shape
        _n, c_out, c_in_g, kh, kw = weight.shape
        mixed = _mixed_kernels(weight, kernel_att, batch).reshape(batch, c_out, c_in_g, kh * kw)
        scale = _kernel_scale(
            _row_scale(channel_att, filter_att, weight, batch, groups), spatial_att
        )
        y = F.conv2d(
            x.reshape(1, batch * c_in, height, width),
            (mixed * scale).reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.repeat(batch),
            stride,
            padding,
            dilation,
            groups * batch,
        )
        ctx.save_for_backward(x, weight, channel_att, filter_att, spatial_att, kernel_att)
        ctx.conv = (stride, padding, dilation, groups, bias is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, channel_att, filter_att, spatial_att, kernel_att = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        need = ctx.needs_input_grad
        batch, c_in, height, width = x.shape
        n, c_out, c_in_g, kh, kw = weight.shape
        taps = kh * kw
        mixed = _mixed_kernels(weight, kernel_att, batch).reshape(batch, c_out, c_in_g, taps)
        row = _row_scale(channel_att, filter_att, weight, batch, groups)  # (B, C_out, C_in/g)
        scale = _kernel_scale(row, spatial_att)
        grad_x, grad_folded, _ = torch.ops.aten.convolution_backward(
            grad_y.reshape(1, batch * c_out, *grad_y.shape[2:]),
            x.reshape(1, batch * c_in, height, width),
            (mixed * scale).reshape(-1, c_in_g, kh, kw),
            None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups * batch,
            [need[0], any(need[1:6]), False],
        )
        grads: list[Tensor | None] = [None] * 11
        if need[0]:
            grads[0] = grad_x.view_as(x)
        if has_bias and need[6]:
            grads[6] = grad_y.reshape(batch, c_out, -1).sum(dim=(0, 2))
        if not any(need[1:6]):
            return tuple(grads)
        grad_folded = grad_folded.view(batch, c_out, c_in_g, taps)
        wants_channel = channel_att is not None and need[2]
        wants_filter = filter_att is not None and need[3]
        wants_spatial = spatial_att is not None and need[4]
        if wants_channel or wants_filter or wants_spatial:
            by_mixed = (grad_folded * mixed).view(batch, c_out * c_in_g, taps)  # E_b
            if wants_spatial:
                grads[4] = torch.bmm(row.reshape(batch, 1, -1), by_mixed).view(batch, taps)
            if wants_channel or wants_filter:
                if spatial_att is None:
                    grad_row = by_mixed.sum(-1)
                else:
                    grad_row = torch.bmm(by_mixed, spatial_att.view(batch, taps, 1))
                grad_row = grad_row.view(batch, c_out, c_in_g)
                if wants_filter:
                    channel = _grouped_channels(channel_att, batch, c_out, c_in_g, groups)
                    grads[3] = grad_row.sum(2) if channel is None else (grad_row * channel).sum(2)
                if wants_channel:
                    per_out = grad_row if filter_att is None else grad_row * filter_att[:, :, None]
                    grads[2] = (
                        per_out.view(batch, groups, c_out // groups, c_in_g)
                        .sum(2)
                        .reshape(batch, c_in)
                    )
        if need[1] or need[5]:
            grad_mixed = (grad_folded * scale).reshape(batch, -1)
            if kernel_att is None:
                if need[1]:
                    grads[1] = grad_mixed.sum(0).view_as(weight)
            else:
                if need[1]:
                    grads[1] = (kernel_att.t() @ grad_mixed).view_as(weight)
                if need[5]:
                    grads[5] = grad_mixed @ weight.reshape(n, -1).t()
        return tuple(grads)


def _mixed_kernels(weight: Tensor, kernel_att: Tensor | None, batch: int) -> Tensor:
    """``M_b``: (B, C_out, C_in / g, kh, kw) (an expanded view of ``W_0`` when n = 1)."""
    n, *shape = weight.shape
    if kernel_att is None:
        return weight[0].expand(batch, *shape)
    return (kernel_att @ weight.reshape(n, -1)).view(batch, *shape)


def _grouped_channels(
    channel_att: Tensor | None, batch: int, c_out: int, c_in_g: int, groups: int
) -> Tensor | None:
    """Channel attention seen by each kernel row: (B, C_in) → (B, C_out, C_in / g)."""
    if channel_att is None:
        return None
    per_group = channel_att.view(batch, groups, 1, c_in_g)
    return per_group.expand(batch, groups, c_out // groups, c_in_g).reshape(batch, c_out, c_in_g)


def _row_scale(
    channel_att: Tensor | None, filter_att: Tensor | None, weight: Tensor, batch: int, groups: int
) -> Tensor:
    """``r_b[o, c] = a_f[b, o] · a_c[b, c]``: (B, C_out, C_in / g) (ones where both are None)."""
    _n, c_out, c_in_g = weight.shape[:3]
    channel = _grouped_channels(channel_att, batch, c_out, c_in_g, groups)
    if filter_att is None:
        return weight.new_ones(batch, c_out, c_in_g) if channel is None else channel
    return (
        filter_att[:, :, None].expand(batch, c_out, c_in_g)
        if channel is None
        else (channel * filter_att[:, :, None])
    )


def _kernel_scale(row: Tensor, spatial_att: Tensor | None) -> Tensor:
    """``r_b ⊗ a_s[b]``: (B, C_out, C_in / g, T), or (B, C_out, C_in / g, 1) without spatial attention."""
    if spatial_att is None:
        return row[..., None]
    return row[..., None] * spatial_att[:, None, None, :]
