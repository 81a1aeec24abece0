"""``DigitsDataModule``: the embedded default, real images that ship inside scikit-learn.

scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 scanned 8×8
grey-level images of the digits 0–9, from the UCI optical recognition data set) need no download.
They are presented as small RGB images: upsampled (bilinear) to ``image_size``, the grey level
repeated on three channels, scaled to [-1, 1]. The split is stratified and fixed by ``split_seed``:
with the defaults, 1,437 training and 360 validation images, 36 of each class in validation. The
digits have no separate test split: ``test`` and ``predict`` use the validation images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

NUM_CLASSES = 10


def digit_images(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as RGB images.

    Returns:
        images (1797, 3, image_size, image_size) in [-1, 1], labels (1797,) in 0..9.
    """
    digits = load_digits()
    grey = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    if image_size != grey.shape[-1]:
        grey = F.interpolate(
            grey, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = (grey.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class RandomShift(Dataset):
    """Training view of an image tensor dataset: each image shifted by up to ``max_shift`` pixels.

    Shapes: item ``(image (3, S, S), label ())``; the border is filled with the background (-1).
    """

    def __init__(self, images: Tensor, labels: Tensor, max_shift: int) -> None:
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.max_shift > 0:
            s = self.max_shift
            padded = F.pad(image, (s, s, s, s), value=-1.0)
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
        return image, self.labels[index]


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 1,797 handwritten digits as small RGB images, with a fixed stratified split.

    Args:
        image_size: side of the RGB images (the digits are 8×8; at least 7 for the FFT stem).
        batch_size: per device.
        val_fraction: share of every class held out for validation.
        split_seed: seed of the stratified split (fixed: the same split on every run and rank).
        max_shift: training augmentation, a random shift of up to this many pixels (0 = none).
        num_workers: data-loading processes (the images are in memory: 0 is fastest).

    Attributes:
        num_classes: 10.

    Example::

        >>> data = DigitsDataModule(image_size=32)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> images.shape, labels.shape
        (torch.Size([64, 3, 32, 32]), torch.Size([64]))
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        max_shift: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1; got {val_fraction}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_classes = NUM_CLASSES
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str) -> None:
        if self.val_set is not None:
            return
        images, labels = digit_images(self.image_size)
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.hparams.val_fraction,
            stratify=labels.numpy(),
            random_state=self.hparams.split_seed,
        )
        train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        self.train_set = RandomShift(images[train_idx], labels[train_idx], self.hparams.max_shift)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking DigitsDataModule for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
