"""``FFTStem``: the initial kernel representation ``d_0`` from the low frequencies of the input image."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def low_frequency_dft(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of the lowest frequencies of ``rfft2(x, norm="forward")``.

    Frequencies ``k_h ∈ {-(f-1), …, f-1}`` (rows, in that order) and ``k_w ∈ {0, …, f-1}``
    (columns): every frequency with ``|k_h|, |k_w| < f`` up to conjugate symmetry. Only these
    entries are computed, by two small DFT matrices (``O(f·H·W)`` instead of a full FFT), which is
    cheaper, runs under bfloat16 autocast and is counted by FLOP counters as matrix products.
    Equal to the matching entries of ``torch.fft.rfft2(x, norm="forward")`` (tested).

    Args:
        x: images (B, C, H, W), with ``H, W >= 2f - 1``.
        size: ``f``.

    Returns:
        ``(real, imag)``, each (B, C, 2f - 1, f).
    """
    height, width = x.shape[-2:]
    f = size
    device = x.device
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    k_h = torch.arange(-(f - 1), f, device=device, dtype=dtype)
    k_w = torch.arange(f, device=device, dtype=dtype)
    pos_h = torch.arange(height, device=device, dtype=dtype)
    pos_w = torch.arange(width, device=device, dtype=dtype)
    angle_h = (2 * math.pi / height) * torch.outer(k_h, pos_h)  # (2f-1, H)
    angle_w = (2 * math.pi / width) * torch.outer(pos_w, k_w)  # (W, f)
    basis_w = torch.cat([torch.cos(angle_w), torch.sin(angle_w)], dim=1) / width  # (W, 2f)
    basis_h = torch.cat([torch.cos(angle_h), torch.sin(angle_h)], dim=0) / height  # (2(2f-1), H)
    # exp(-i·a_h)·exp(-i·a_w): real = cos·cos - sin·sin, imag = -(sin·cos + cos·sin).
    rows = x.to(dtype) @ basis_w  # (B, C, H, 2f)
    full = basis_h @ rows  # (B, C, 2(2f-1), 2f)
    n_h = 2 * f - 1
    cos_cos, cos_sin = full[..., :n_h, :f], full[..., :n_h, f:]
    sin_cos, sin_sin = full[..., n_h:, :f], full[..., n_h:, f:]
    return cos_cos - sin_sin, -(sin_cos + cos_sin)


class FFTStem(nn.Module):
    """``d_0 = Linear(LayerNorm(flatten[Re, Im](low_freq(FFT2(image)))))``.

    The lowest ``f × f`` frequencies (see :func:`low_frequency_dft`) of every input channel, real and
    imaginary parts, normalised by the image size (``norm="forward"``) so that any image size gives
    features on the same scale, then a LayerNorm and a linear projection to ``D``. The FFT of the
    *input image* captures its global layout; the poster fixes nothing more.

    Args:
        in_channels: image channels ``C``.
        repr_dim: ``D``.
        freq_size: ``f``; the input must be at least ``2f - 1`` pixels on each side.

    Shapes: image (B, C, H, W) → d_0 (B, D).
    """

    def __init__(self, in_channels: int = 3, repr_dim: int = 32, freq_size: int = 4) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.freq_size = freq_size
        features = 2 * in_channels * (2 * freq_size - 1) * freq_size
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, repr_dim)

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"FFTStem expects images of shape (B, {self.in_channels}, H, W); got "
                f"{tuple(image.shape)}"
            )
        min_side = 2 * self.freq_size - 1
        if min(image.shape[-2:]) < min_side:
            raise ValueError(
                f"FFTStem with freq_size={self.freq_size} needs images of at least "
                f"{min_side}x{min_side}; got {tuple(image.shape[-2:])}. Lower fft_size."
            )
        # The DFT is cheap and sensitive to rounding: keep it in float32 under autocast.
        with torch.autocast(device_type=image.device.type, enabled=False):
            real, imag = low_frequency_dft(image.float(), self.freq_size)
            features = torch.cat([real, imag], dim=1).flatten(1)
        return self.proj(self.norm(features.to(self.proj.weight.dtype)))
