"""LightningModule that trains a PatchAutoencoder (dynamic or static) and scores it by PSNR/SSIM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_kr.patch.autoencoder import AutoencoderKind, build_autoencoder
from lightning_kr.patch.hybrid_dense import HybridVariant


class LitAutoencoder(L.LightningModule):
    """Train :func:`build_autoencoder`'s model on image crops with an MSE loss.

    The loss is taken on the decoder output before its ``[0, 1]`` clamp (see
    :class:`PatchAutoencoder`); validation scores the clamped reconstruction with PSNR and SSIM
    (``data_range=1``; PSNR from the mean squared error over the whole validation set).
    ``predict_step`` reconstructs whole images of any size: they are edge-padded to a multiple
    of the downscale and cropped back.

    Args:
        kind: ``"dynamic"`` (PatchDynamicConv2d) or ``"static"`` (ordinary convs, same size).
        encoder_hidden: HybridDense width(s) of the encoder's kernel predictors.
        decoder_hidden: HybridDense width(s) of the decoder's kernel predictors.
        decoder_kernel_size: kernel size of the decoder on the latent grid.
        latent_channels: channels of the latent.
        downscale: spatial reduction of the encoder.
        variant: HybridDense variant, ``"signed"`` or ``"relu"``.
        lr: peak learning rate of AdamW under a one-cycle schedule.
        weight_decay: AdamW weight decay.

    Example::

        >>> module = LitAutoencoder(kind="static")
        >>> module(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(
        self,
        kind: AutoencoderKind = "dynamic",
        encoder_hidden: int | Sequence[int] = 14,
        decoder_hidden: int | Sequence[int] = 8,
        decoder_kernel_size: int = 3,
        latent_channels: int = 4,
        downscale: int = 8,
        variant: HybridVariant = "signed",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.autoencoder = build_autoencoder(
            kind,
            latent_channels=latent_channels,
            downscale=downscale,
            encoder_hidden=encoder_hidden,
            decoder_hidden=decoder_hidden,
            decoder_kernel_size=decoder_kernel_size,
            variant=variant,
        )
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` (H, W multiples of the downscale) -> same shape."""
        return self.autoencoder(images)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        latent = self.autoencoder.encode(batch)
        loss = F.mse_loss(self.autoencoder.decode_unclamped(latent), batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        reconstruction = self(batch)
        self.val_psnr(reconstruction, batch)
        self.val_ssim(reconstruction, batch)
        self.log("val/loss", F.mse_loss(reconstruction, batch))
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        self.log("val/ssim", self.val_ssim, prog_bar=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"image": (1, 3, H, W), "path": [str]}`` -> ``{"reconstruction": (1, 3, H, W), "path"}``."""
        images = batch["image"]
        height, width = images.shape[-2:]
        factor = self.hparams.downscale
        pad_bottom, pad_right = -height % factor, -width % factor
        padded = F.pad(images, (0, pad_right, 0, pad_bottom), mode="replicate")
        reconstruction = self(padded)[..., :height, :width]
        return {"reconstruction": reconstruction, "path": batch["path"]}

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.hparams.lr,
            total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=0.1,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
