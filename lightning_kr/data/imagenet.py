"""ImageNet from image folders, where an unreadable image is skipped, counted and reported.

Three pieces:

* :class:`SkipUnreadableImageFolder` — an ``ImageFolder`` whose unreadable or corrupt images come
  back as :class:`SkippedImage` markers instead of raising inside a worker.
* :func:`collate_skipping` — drops the markers from a batch and carries their paths along.
* :class:`ImageNetDataModule` — ``root/train`` and ``root/val``, the standard transforms; it takes
  the skipped paths out of each batch, and :class:`SkippedImagesReport` (a callback) reports them at
  the end of every epoch: a warning with their paths and the logged count
  ``data/skipped_images_{train,val,test}``.
  Training never stops mid-epoch for a bad file, and no bad file goes unreported (without the
  callback, the data module reports them when the run ends).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, v2

from lightning_kr.data.folder_layout import LAYOUT, DataRootError, class_folders, image_files
from lightning_kr.data.rgb import load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READ_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)
SHOWN_PATHS = 5


class SkippedImage(NamedTuple):
    """What a dataset returns in place of a sample it could not read."""

    path: str
    error: str


class ImageBatch(NamedTuple):
    """A collated batch: images (B, C, H, W), targets (B,), and the ``(path, error)`` of the images
    of this batch that could not be read (not part of ``images``)."""

    images: Tensor
    targets: Tensor
    skipped: list[tuple[str, str]]


class SkipUnreadableImageFolder(ImageFolder):
    """``ImageFolder`` that returns a :class:`SkippedImage` for an image it cannot read or decode.

    Args:
        root: folder with one sub-folder per class.
        transform: applied to the PIL image.
        classes: the class names, in label order, to use instead of the sub-folders of ``root``
            (so that a validation folder gets the labels of the training folder). Missing or empty
            class folders are allowed then; unknown ones are an error.

    Images in any colour mode are read as 8-bit RGB (:func:`~lightning_kr.data.rgb.load_rgb`). The
    files are listed by :func:`~lightning_kr.data.folder_layout.image_files`: a symbolic link loop or
    a directory named like an image is refused or passed over when the data set is built, not met
    during training.

    Raises:
        DataRootError: (without ``classes``) a class folder holds no image; a class folder the
            training folder lacks; a symbolic link that loops or leads nowhere.

    Shapes: item ``(transform(image), label)`` or ``SkippedImage(path, error)``.
    """

    def __init__(
        self, root: str | Path, transform: Any = None, classes: list[str] | None = None
    ) -> None:
        self._given_classes = classes
        super().__init__(
            root, transform=transform, loader=load_rgb, allow_empty=classes is not None
        )

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        if self._given_classes is None:
            return super().find_classes(directory)
        found = {entry.name for entry in os.scandir(directory) if entry.is_dir()}
        unknown = sorted(found - set(self._given_classes))
        if unknown:
            raise DataRootError(
                f"{directory} has class folders that the training folder lacks ({', '.join(unknown[:5])}"
                "): give both the same class folders (val may leave some out)."
            )
        return list(self._given_classes), {c: i for i, c in enumerate(self._given_classes)}

    @staticmethod
    def make_dataset(
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """``(path, label)`` of every image, class by class, as ``ImageFolder`` lists them, with
        the checks of :func:`~lightning_kr.data.folder_layout.image_files`."""
        extensions = extensions or IMG_EXTENSIONS
        is_image = is_valid_file or (lambda path: path.lower().endswith(extensions))
        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        for name in sorted(class_to_idx):
            folder = Path(directory) / name
            if not folder.is_dir():
                continue
            files = image_files(folder, is_image)
            if not files:
                empty.append(str(folder))
            samples += [(path, class_to_idx[name]) for path in files]
        if not allow_empty and not samples:
            layout = LAYOUT.format(root=Path(directory).parent)
            raise DataRootError(
                f"{directory} holds no images in its class folders ({', '.join(extensions)}). "
                f"{layout}"
            )
        if not allow_empty and empty:
            raise DataRootError(
                f"{len(empty)} class folder(s) hold no images ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}): put the class's images ({', '.join(extensions)}) "
                "in each, or remove it."
            )
        return samples

    def __getitem__(self, index: int) -> tuple[Any, int] | SkippedImage:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
            if self.transform is not None:
                image = self.transform(image)
        except READ_ERRORS as error:
            return SkippedImage(path, f"{type(error).__name__}: {error}")
        return image, target


def collate_skipping(items: list[tuple[Any, int] | SkippedImage]) -> ImageBatch:
    """Collate the readable samples; list the skipped ones in ``ImageBatch.skipped``.

    Raises:
        RuntimeError: if not one image of the batch could be read: that is a wrong root or
            transform, not a corrupt file.
    """
    skipped = [(item.path, item.error) for item in items if isinstance(item, SkippedImage)]
    readable = [item for item in items if not isinstance(item, SkippedImage)]
    if not readable:
        raise RuntimeError(
            f"none of the {len(items)} images of a batch could be read; the first error was "
            f"{skipped[0][1]} ({skipped[0][0]}). Check the data root and the transforms."
        )
    images, targets = default_collate(readable)
    return ImageBatch(images, targets, skipped)


def train_transform(
    image_size: int = 224,
    rand_augment_magnitude: int | None = None,
    random_erasing: float = 0.0,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
) -> v2.Compose:
    """RandomResizedCrop, horizontal flip, [RandAugment], normalise, [random erasing]: PIL → (3, S, S)."""
    steps: list[Any] = [
        v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if rand_augment_magnitude is not None:
        steps.append(
            v2.RandAugment(num_ops=2, magnitude=rand_augment_magnitude, interpolation=interpolation)
        )
    steps += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing))
    return v2.Compose(steps)


def eval_transform(
    image_size: int = 224,
    resize_size: int = 256,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
) -> v2.Compose:
    """Resize the short side, centre crop, normalise: PIL → (3, S, S)."""
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageNetDataModule(LightningDataModule):
    """ImageNet (or any data set in the same layout) from ``root/train`` and ``root/val``.

    Training: ``RandomResizedCrop(image_size)`` and a horizontal flip (plus, optionally, DeiT's
    RandAugment, random erasing and Mixup / CutMix). Evaluation: resize the short side to
    ``resize_size``, centre crop ``image_size``. ``test`` and ``predict`` use ``root/val``.
    Unreadable images are skipped and reported (see the module docstring). The layout is checked
    when the data module is built (a wrong root, a single class, val classes that train lacks) and
    the files when it is set up (empty class folders, link loops), so a data root that cannot be
    trained on fails before training, with a :class:`DataRootError` that names the path and the fix.
    Images in any colour mode (grey, 16-bit, CMYK, RGBA, palette) are read as RGB.

    Args:
        root: folder holding ``train/<class>/*`` and ``val/<class>/*``.
        batch_size: per device (the global batch is ``batch_size × devices × nodes``).
        num_workers: data-loading processes per device.
        image_size: training / evaluation crop.
        resize_size: short side before the evaluation centre crop.
        pin_memory: page-locked batches for faster host-to-GPU copies.
        rand_augment_magnitude: RandAugment (2 operations) of this magnitude; ``None`` = off.
        random_erasing: probability of random erasing; 0 = off.
        mixup_alpha, cutmix_alpha: Mixup / CutMix on training batches (one of the two per batch,
            targets become (B, K) probabilities); 0 = off.
        interpolation: ``"bilinear"`` or ``"bicubic"`` resampling.

    Attributes:
        num_classes: the number of class folders in ``root/train``.
        classes: their names, in label order.

    Example::

        >>> data = ImageNetDataModule("/data/imagenet", batch_size=32)  # doctest: +SKIP
        >>> data.num_classes  # doctest: +SKIP
        1000
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
        pin_memory: bool = True,
        rand_augment_magnitude: int | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = class_folders(root)
        self.root = Path(root).expanduser()
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.batch_size = batch_size
        mode = InterpolationMode(interpolation)
        self.train_transform = train_transform(
            image_size, rand_augment_magnitude, random_erasing, mode
        )
        self.eval_transform = eval_transform(image_size, resize_size, mode)
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=self.num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=self.num_classes))
        self.batch_mix = v2.RandomChoice(mixes) if mixes else None
        self.train_set: SkipUnreadableImageFolder | None = None
        self.val_set: SkipUnreadableImageFolder | None = None
        self.skipped: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            self.train_set = SkipUnreadableImageFolder(self.root / "train", self.train_transform)
        if self.val_set is None:
            self.val_set = SkipUnreadableImageFolder(
                self.root / "val", self.eval_transform, classes=self.classes
            )
        if len(self.val_set) == 0:
            raise DataRootError(
                f"{self.root / 'val'} holds no images: put each class's validation images in "
                f"val/<class>/. {LAYOUT.format(root=self.root)}"
            )

    def _loader(self, dataset: SkipUnreadableImageFolder | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking ImageNetDataModule for a dataloader")
        workers = self.hparams.num_workers
        # A last partial training batch is dropped (BatchNorm and the throughput figures want full
        # ones), unless the set is too small for one full batch per process: a small folder trains.
        processes = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) >= self.batch_size * processes,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
            collate_fn=collate_skipping,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def _stage(self) -> str:
        trainer = self.trainer
        if trainer is None or trainer.training:
            return "train"
        if trainer.sanity_checking:
            return "sanity_check"
        if trainer.validating:
            return "validate"
        return "test" if trainer.testing else "predict"

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, ImageBatch):
            if batch.skipped:
                self.skipped[self._stage()].extend(batch.skipped)
            return batch.images, batch.targets
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.batch_mix is not None and self.trainer is not None and self.trainer.training:
            return self.batch_mix(*batch)
        return batch

    def pop_skipped(self, stage: str) -> list[tuple[str, str]]:
        """The ``(path, error)`` of images skipped by this process in ``stage`` since the last pop."""
        return self.skipped.pop(stage, [])

    def teardown(self, stage: str) -> None:
        left = {name: paths for name, paths in self.skipped.items() if paths}
        if left:
            count = sum(len(paths) for paths in left.values())
            first = next(iter(left.values()))[:SHOWN_PATHS]
            rank_zero_warn(
                f"ImageNetDataModule skipped {count} unreadable images that no SkippedImagesReport "
                f"callback reported ({', '.join(f'{p} ({e})' for p, e in first)}, ...). Add "
                "lightning_kr.data.SkippedImagesReport() to the trainer's callbacks to get them "
                "reported at the end of every epoch."
            )
            self.skipped.clear()


class SkippedImagesReport(Callback):
    """At the end of every epoch, report the images the data module could not read.

    Works with any data module that has ``pop_skipped(stage)`` (:class:`ImageNetDataModule`); with
    others it does nothing. The count, summed over all processes, is logged as
    ``data/skipped_images_{train,val,test}`` and a warning lists the first paths.

    Example::

        >>> trainer = Trainer(callbacks=[SkippedImagesReport()])  # doctest: +SKIP
    """

    def __init__(self, shown_paths: int = SHOWN_PATHS) -> None:
        self.shown_paths = shown_paths
        self.total: dict[str, int] = defaultdict(int)

    def _report(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, log_as: str | None
    ) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "pop_skipped"):
            return
        skipped = data.pop_skipped(stage)
        # A collective call: every process takes part, whatever it skipped.
        mine = torch.tensor(float(len(skipped)), device=pl_module.device)  # NCCL needs the GPU
        count = int(trainer.strategy.reduce(mine, reduce_op="sum"))
        self.total[stage] += count
        if log_as is not None:
            pl_module.log(f"data/skipped_images_{log_as}", float(count), rank_zero_only=True)
        if count:
            shown = "\n  ".join(f"{path}: {error}" for path, error in skipped[: self.shown_paths])
            rank_zero_warn(
                f"{stage} epoch {trainer.current_epoch}: skipped {count} unreadable images "
                f"({self.total[stage]} so far in {stage}). On this process:\n  {shown}"
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train", log_as="train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            self._report(trainer, pl_module, "sanity_check", log_as=None)
        else:
            self._report(trainer, pl_module, "validate", log_as="val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test", log_as="test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "predict", log_as=None)
