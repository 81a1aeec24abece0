"""Real photographs that ship inside scikit-image, as a LightningDataModule of crops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

# Natural RGB photographs bundled in the scikit-image wheel (skimage/data/*): no download needed.
TRAIN_IMAGES = (
    "chelsea.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
VAL_IMAGES = ("astronaut.png", "coffee.png")


def skimage_data_dir() -> Path:
    """The folder of the installed ``skimage.data`` package, where its bundled images lie."""
    import skimage.data

    return Path(skimage.data.__file__).parent


def read_rgb(path: str | Path) -> Tensor:
    """Read a PNG or JPEG as float RGB ``(3, H, W)`` in ``[0, 1]`` (gray is repeated, alpha dropped)."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    return decode_image(data, mode=ImageReadMode.RGB).float() / 255.0


def load_sample_image(name: str) -> Tensor:
    """One of scikit-image's bundled images by file name, as ``(3, H, W)`` in ``[0, 1]``.

    Only files already inside the installed package are read; scikit-image's downloader is never
    called.
    """
    path = skimage_data_dir() / name
    if not path.is_file():
        available = sorted(p.name for p in skimage_data_dir().glob("*.[pj][np]g"))
        raise MisconfigurationException(
            f"{name!r} is not bundled with the installed scikit-image ({path.parent}); "
            f"pick among {available}."
        )
    return read_rgb(path)


class RandomCrops(Dataset):
    """``length`` random ``size×size`` crops with random horizontal and vertical flips.

    Each item picks an image uniformly, then a crop position uniformly. Randomness comes from
    torch's global generator (seeded by ``seed_everything``, and per worker by the DataLoader).

    Args:
        images: images ``(3, H_i, W_i)``, each at least ``size`` on both sides.
        size: crop side.
        length: number of crops per epoch.
    """

    def __init__(self, images: Sequence[Tensor], size: int, length: int) -> None:
        too_small = [tuple(image.shape[-2:]) for image in images if min(image.shape[-2:]) < size]
        if too_small:
            raise MisconfigurationException(f"crop size {size} is larger than images {too_small}.")
        self.images = list(images)
        self.size = size
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        """A crop ``(3, size, size)`` in ``[0, 1]``."""
        image = self.images[int(torch.randint(len(self.images), ()))]
        height, width = image.shape[-2:]
        top = int(torch.randint(height - self.size + 1, ()))
        left = int(torch.randint(width - self.size + 1, ()))
        crop = image[:, top : top + self.size, left : left + self.size]
        flips = [dim for dim in (-1, -2) if torch.rand(()) < 0.5]
        return crop.flip(flips) if flips else crop.clone()


def grid_crops(images: Sequence[Tensor], size: int) -> Tensor:
    """Every non-overlapping ``size×size`` tile of every image, ``(N, 3, size, size)``."""
    tiles = [
        image[:, top : top + size, left : left + size]
        for image in images
        for top in range(0, image.shape[-2] - size + 1, size)
        for left in range(0, image.shape[-1] - size + 1, size)
    ]
    return torch.stack(tiles)


class ImageFiles(Dataset):
    """Images read from ``paths``, each ``{"image": (3, H, W) in [0, 1], "path": str}``."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        return {"image": read_rgb(self.paths[index]), "path": self.paths[index]}


class SampleImagesDataModule(L.LightningDataModule):
    """Crops of the photographs bundled with scikit-image; held-out photos for validation.

    Training draws random crops with flips from ``train_images``; validation tiles the held-out
    ``val_images`` (not seen in training) into fixed ``val_crop_size`` crops; prediction reads
    the files in ``predict_paths`` whole, one per batch.

    Args:
        train_images: file names in ``skimage/data`` to train on.
        val_images: held-out file names in ``skimage/data``.
        crop_size: side of the training crops (a multiple of the model's downscale).
        val_crop_size: side of the validation tiles.
        batch_size: crops per training and validation batch.
        samples_per_epoch: training crops per epoch.
        predict_paths: image files to reconstruct with ``predict``.
        num_workers: DataLoader workers.

    Example::

        >>> data = SampleImagesDataModule(batch_size=4, samples_per_epoch=8)
        >>> data.setup("fit")
        >>> next(iter(data.train_dataloader())).shape
        torch.Size([4, 3, 64, 64])
    """

    def __init__(
        self,
        train_images: Sequence[str] = TRAIN_IMAGES,
        val_images: Sequence[str] = VAL_IMAGES,
        crop_size: int = 64,
        val_crop_size: int = 128,
        batch_size: int = 16,
        samples_per_epoch: int = 2400,
        predict_paths: Sequence[str] = (),
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        overlap = set(train_images) & set(val_images)
        if overlap:
            raise MisconfigurationException(
                f"{sorted(overlap)} are in both train_images and val_images; held-out means disjoint."
            )
        self.train_images = list(train_images)
        self.val_images = list(val_images)
        self.crop_size = crop_size
        self.val_crop_size = val_crop_size
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.predict_paths = list(predict_paths)
        self.num_workers = num_workers

    def setup(self, stage: str) -> None:
        if stage == "fit":
            train = [load_sample_image(name) for name in self.train_images]
            self.train_set = RandomCrops(train, self.crop_size, self.samples_per_epoch)
        if stage in ("fit", "validate"):
            val = [load_sample_image(name) for name in self.val_images]
            self.val_set = grid_crops(val, self.val_crop_size)
        if stage == "predict":
            if not self.predict_paths:
                raise MisconfigurationException(
                    "predict needs images: pass --data.predict_paths='[photo.png, ...]'."
                )
            self.predict_set = ImageFiles(self.predict_paths)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=1, num_workers=self.num_workers)
