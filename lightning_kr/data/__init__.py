"""Data for the recipes: ImageNet folders with unreadable images skipped, and the embedded digits."""

from lightning_kr.data.digits import DigitsDataModule
from lightning_kr.data.folder_layout import DataRootError
from lightning_kr.data.imagenet import (
    ImageNetDataModule,
    SkippedImage,
    SkippedImagesReport,
    SkipUnreadableImageFolder,
    collate_skipping,
)
from lightning_kr.data.rgb import load_rgb

__all__ = [
    "DataRootError",
    "DigitsDataModule",
    "ImageNetDataModule",
    "SkipUnreadableImageFolder",
    "SkippedImage",
    "SkippedImagesReport",
    "collate_skipping",
    "load_rgb",
]
