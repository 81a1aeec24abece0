"""Per-sample kernels from the candidates and the attentions, for a kernel of any rank.

``B × n × |W|`` is never materialised: the candidates are mixed with one matrix product
``(B, n) @ (n, |W|)`` (see ``docs/method.md`` for the aggregated kernel).
"""

from __future__ import annotations

from torch import Tensor


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
    else:  # broadcast, not expanded: an exported graph would write B copies before scaling
        kernels = weight[0].unsqueeze(0)
    if spatial_att is not None:
        kernels = kernels * spatial_att.to(weight.dtype).view(batch, 1, 1, *shape[2:])
    return kernels.expand(batch, *shape)


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
