"""Data for the recipes: ImageNet folders with unreadable images skipped, and the embedded digits."""

from lightning_kr.data.digits import DigitsDataModule
from lightning_kr.data.imagenet import (
    ImageNetDataModule,
    SkippedImage,
    SkippedImagesReport,
    SkipUnreadableImageFolder,
    collate_skipping,
)

__all__ = [
    "DigitsDataModule",
    "ImageNetDataModule",
    "SkipUnreadableImageFolder",
    "SkippedImage",
    "SkippedImagesReport",
    "collate_skipping",
]
