"""``FFTStem``: the initial kernel representation ``d_0`` from the low frequencies of the input image
or video."""

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
        x: images (B, C, H, W), with ``H, W >= 2f - 1`` (any leading dimensions: the transform is
            over the last two).
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


def low_frequency_dft3d(x: Tensor, size: int, time_size: int) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of the lowest frequencies of a video's 3-D DFT (``norm="forward"``).

    Frequencies ``k_t ∈ {-(f_t-1), …, f_t-1}`` × ``k_h ∈ {-(f-1), …, f-1}`` × ``k_w ∈ {0, …, f-1}``:
    the 2-D low frequencies of every frame (:func:`low_frequency_dft`), then a small temporal DFT
    matrix over the frames. Equal to the matching entries of
    ``torch.fft.rfftn(x, dim=(-3, -2, -1), norm="forward")`` (tested).

    Args:
        x: videos (B, C, T, H, W), with ``T >= 2f_t - 1`` and ``H, W >= 2f - 1``.
        size: ``f``.
        time_size: ``f_t``.

    Returns:
        ``(real, imag)``, each (B, C, 2f_t - 1, 2f - 1, f).
    """
    real, imag = low_frequency_dft(x, size)  # (B, C, T, 2f-1, f) each
    frames = x.shape[-3]
    k_t = torch.arange(-(time_size - 1), time_size, device=real.device, dtype=real.dtype)
    pos_t = torch.arange(frames, device=real.device, dtype=real.dtype)
    angle_t = (2 * math.pi / frames) * torch.outer(k_t, pos_t)  # (2f_t-1, T)
    cos_t, sin_t = torch.cos(angle_t) / frames, torch.sin(angle_t) / frames
    spatial = real.shape[-2:]
    real, imag = real.flatten(-2), imag.flatten(-2)  # (B, C, T, (2f-1)·f)
    # exp(-i·a_t)·(real + i·imag) = (cos·real + sin·imag) + i·(cos·imag - sin·real).
    out_real = cos_t @ real + sin_t @ imag
    out_imag = cos_t @ imag - sin_t @ real
    return out_real.unflatten(-1, spatial), out_imag.unflatten(-1, spatial)


class FFTStem(nn.Module):
    """``d_0 = Linear(LayerNorm(flatten[Re, Im](low_freq(FFT(input)))))`` for images or videos.

    The lowest ``f × f`` frequencies (see :func:`low_frequency_dft`) of every input channel, real and
    imaginary parts, normalised by the image size (``norm="forward"``) so that any image size gives
    features on the same scale, then a LayerNorm and a linear projection to ``D``. The FFT of the
    *input image* captures its global layout; the poster fixes nothing more. For videos
    (``time_freq > 0``) the low frequencies over time and space (:func:`low_frequency_dft3d`): the
    number of features is fixed by ``f_t`` and ``f``, whatever the number of frames.

    Args:
        in_channels: image channels ``C``.
        repr_dim: ``D``.
        freq_size: ``f``; the input must be at least ``2f - 1`` pixels on each side.
        time_freq: ``f_t``; 0 (default): images; > 0: videos with at least ``2f_t - 1`` frames.

    Shapes: image (B, C, H, W) or, with ``time_freq > 0``, video (B, C, T, H, W) → d_0 (B, D).

    Example::

        >>> stem = FFTStem(3, repr_dim=16, freq_size=4, time_freq=2)
        >>> stem(torch.randn(2, 3, 8, 32, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self, in_channels: int = 3, repr_dim: int = 32, freq_size: int = 4, time_freq: int = 0
    ) -> None:
        super().__init__()
        if time_freq < 0:
            raise ValueError(f"time_freq must be 0 (images) or positive (videos); got {time_freq}")
        self.in_channels = in_channels
        self.freq_size = freq_size
        self.time_freq = time_freq
        features = 2 * in_channels * (2 * freq_size - 1) * freq_size
        if time_freq:
            features *= 2 * time_freq - 1
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, repr_dim)

    def forward(self, image: Tensor) -> Tensor:
        self._check_input(image)
        # The DFT is cheap and sensitive to rounding: keep it in float32 under autocast.
        with torch.autocast(device_type=image.device.type, enabled=False):
            if self.time_freq:
                real, imag = low_frequency_dft3d(image.float(), self.freq_size, self.time_freq)
            else:
                real, imag = low_frequency_dft(image.float(), self.freq_size)
            features = torch.cat([real, imag], dim=1).flatten(1)
        return self.proj(self.norm(features.to(self.proj.weight.dtype)))

    def _check_input(self, image: Tensor) -> None:
        if self.time_freq:
            kind, rank, shape = "videos", 5, f"(B, {self.in_channels}, T, H, W)"
            other = " For images, use time_freq=0."
        else:
            kind, rank, shape = "images", 4, f"(B, {self.in_channels}, H, W)"
            other = " For videos, pass time_freq > 0."
        if image.dim() != rank or image.shape[1] != self.in_channels:
            hint = other if image.dim() == 9 - rank else ""
            raise ValueError(
                f"FFTStem expects {kind} of shape {shape}; got {tuple(image.shape)}.{hint}"
            )
        min_side = 2 * self.freq_size - 1
        if min(image.shape[-2:]) < min_side:
            raise ValueError(
                f"FFTStem with freq_size={self.freq_size} needs {kind} of at least "
                f"{min_side}x{min_side}; got {tuple(image.shape[-2:])}. Lower fft_size."
            )
        min_frames = 2 * self.time_freq - 1
        if self.time_freq and image.shape[2] < min_frames:
            raise ValueError(
                f"FFTStem with time_freq={self.time_freq} needs videos of at least {min_frames} "
                f"frames; got T={image.shape[2]}. Lower time_freq."
            )
