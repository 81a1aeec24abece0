"""The preprint's image autoencoder (one PatchDynamicConv2d each way) and its static-conv baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_kr.patch.hybrid_dense import HybridVariant
from lightning_kr.patch.patch_dynamic_conv import PatchDynamicConv2d
from lightning_kr.report import count_parameters

AutoencoderKind = Literal["dynamic", "static"]


class PatchAutoencoder(nn.Module):
    """Image autoencoder ``(B, 3, H, W) -> (B, latent, H/f, W/f) -> (B, 3, H, W)`` in ``[0, 1]``.

    ``decoder`` ends in ``PixelShuffle(f)``; its output is clamped to ``[0, 1]`` in :meth:`decode`.
    :meth:`decode_unclamped` gives the output before the clamp, for a training loss that keeps a
    gradient on pixels that overshoot (``|clamp(y) - t| <= |y - t|`` for targets ``t`` in
    ``[0, 1]``, so that loss bounds the clamped one from above).

    Args:
        encoder: ``(B, 3, H, W) -> (B, latent, H/f, W/f)``.
        decoder: ``(B, latent, H/f, W/f) -> (B, 3, H, W)``.
        downscale: ``f``; ``H`` and ``W`` must be multiples of it.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, downscale: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.downscale = downscale

    def encode(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> latent ``(B, latent, H/f, W/f)``."""
        height, width = images.shape[-2:]
        if height % self.downscale or width % self.downscale:
            raise ValueError(
                f"image size {height}×{width} is not a multiple of {self.downscale}; crop or pad it."
            )
        return self.encoder(images)

    def decode_unclamped(self, latent: Tensor) -> Tensor:
        """Latent ``(B, latent, h, w)`` -> ``(B, 3, h·f, w·f)``, before the clamp."""
        return self.decoder(latent)

    def decode(self, latent: Tensor) -> Tensor:
        """Latent ``(B, latent, h, w)`` -> image ``(B, 3, h·f, w·f)`` in ``[0, 1]``."""
        return self.decode_unclamped(latent).clamp(0.0, 1.0)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> reconstruction ``(B, 3, H, W)`` in ``[0, 1]``."""
        return self.decode(self.encode(images))


def dynamic_autoencoder(
    *,
    image_channels: int = 3,
    latent_channels: int = 4,
    downscale: int = 8,
    encoder_hidden: int | Sequence[int] = 14,
    decoder_hidden: int | Sequence[int] = 8,
    decoder_kernel_size: int = 3,
    variant: HybridVariant = "signed",
) -> PatchAutoencoder:
    """The preprint's autoencoder: one PatchDynamicConv2d down, one up, then PixelShuffle.

    Encoder: ``PatchDynamicConv2d(3, 4, f, stride=f)``, each ``f×f`` block to one latent pixel.
    Decoder: ``PatchDynamicConv2d(4, 3·f², k, padding=k//2)`` then ``PixelShuffle(f)``.

    Args:
        image_channels: channels of the image.
        latent_channels: channels of the latent.
        downscale: ``f``, the stride of the encoder and the factor of the PixelShuffle.
        encoder_hidden: HybridDense width(s) of the encoder's kernel predictors.
        decoder_hidden: HybridDense width(s) of the decoder's kernel predictors.
        decoder_kernel_size: odd kernel size ``k`` of the decoder, on the latent grid.
        variant: HybridDense variant, ``"signed"`` or ``"relu"``.
    """
    encoder = PatchDynamicConv2d(
        image_channels,
        latent_channels,
        downscale,
        stride=downscale,
        hidden=encoder_hidden,
        variant=variant,
    )
    decoder = nn.Sequential(
        PatchDynamicConv2d(
            latent_channels,
            image_channels * downscale**2,
            decoder_kernel_size,
            padding=decoder_kernel_size // 2,
            hidden=decoder_hidden,
            variant=variant,
        ),
        nn.PixelShuffle(downscale),
    )
    return PatchAutoencoder(encoder, decoder, downscale)


def static_autoencoder(
    *,
    image_channels: int = 3,
    latent_channels: int = 4,
    downscale: int = 8,
    encoder_width: int = 114,
    decoder_width: int = 533,
    decoder_kernel_size: int = 3,
) -> PatchAutoencoder:
    """The same autoencoder with ordinary convolutions: a ``k×k`` conv, GELU, a ``1×1`` conv.

    Encoder: ``Conv2d(3, m, f, stride=f)`` GELU ``Conv2d(m, 4, 1)``.
    Decoder: ``Conv2d(4, n, k, padding=k//2)`` GELU ``Conv2d(n, 3·f², 1)`` then ``PixelShuffle(f)``.
    This is the dynamic layer with its kernel predictors replaced by one shared hidden layer:
    same receptive fields, and with :func:`build_autoencoder` the same parameter count.

    Args:
        image_channels: channels of the image.
        latent_channels: channels of the latent.
        downscale: ``f``.
        encoder_width: ``m``, hidden channels of the encoder.
        decoder_width: ``n``, hidden channels of the decoder.
        decoder_kernel_size: odd kernel size ``k`` of the decoder's first conv.
    """
    encoder = nn.Sequential(
        nn.Conv2d(image_channels, encoder_width, downscale, stride=downscale),
        nn.GELU(),
        nn.Conv2d(encoder_width, latent_channels, 1),
    )
    decoder = nn.Sequential(
        nn.Conv2d(
            latent_channels, decoder_width, decoder_kernel_size, padding=decoder_kernel_size // 2
        ),
        nn.GELU(),
        nn.Conv2d(decoder_width, image_channels * downscale**2, 1),
        nn.PixelShuffle(downscale),
    )
    return PatchAutoencoder(encoder, decoder, downscale)


def _matching_width(parameters: int, in_features: int, out_channels: int) -> int:
    """Width ``m`` of ``Conv(in → m) + Conv1×1(m → out)`` with about ``parameters`` parameters."""
    return max(1, round((parameters - out_channels) / (in_features + 1 + out_channels)))


def build_autoencoder(
    kind: AutoencoderKind = "dynamic",
    *,
    image_channels: int = 3,
    latent_channels: int = 4,
    downscale: int = 8,
    encoder_hidden: int | Sequence[int] = 14,
    decoder_hidden: int | Sequence[int] = 8,
    decoder_kernel_size: int = 3,
    variant: HybridVariant = "signed",
) -> PatchAutoencoder:
    """Build the dynamic autoencoder, or the static one with the same parameter count per half.

    ``kind="static"`` sizes :func:`static_autoencoder`'s widths so that its encoder and decoder each
    have (to within one channel) the parameters of the dynamic encoder and decoder built from the
    same arguments.

    Example::

        >>> dynamic = build_autoencoder("dynamic")
        >>> static = build_autoencoder("static")
        >>> abs(count_parameters(static) / count_parameters(dynamic) - 1) < 0.01
        True
    """
    shape = {
        "image_channels": image_channels,
        "latent_channels": latent_channels,
        "downscale": downscale,
        "decoder_kernel_size": decoder_kernel_size,
    }
    if kind == "dynamic":
        return dynamic_autoencoder(
            **shape, encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden, variant=variant
        )
    if kind != "static":
        raise ValueError(f"kind must be 'dynamic' or 'static', got {kind!r}.")
    with torch.device("meta"):
        reference = dynamic_autoencoder(
            **shape, encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden
        )
    encoder_width = _matching_width(
        count_parameters(reference.encoder), image_channels * downscale**2, latent_channels
    )
    decoder_width = _matching_width(
        count_parameters(reference.decoder),
        latent_channels * decoder_kernel_size**2,
        image_channels * downscale**2,
    )
    return static_autoencoder(**shape, encoder_width=encoder_width, decoder_width=decoder_width)
