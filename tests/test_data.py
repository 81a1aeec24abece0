"""The data modules: the embedded digits, and ImageNet folders with unreadable images skipped."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch import nn

from lightning_kr.data import (
    DigitsDataModule,
    ImageNetDataModule,
    SkippedImage,
    SkippedImagesReport,
    SkipUnreadableImageFolder,
    collate_skipping,
)

# ----------------------------------------------------------------------------------- digits


def test_digits_are_small_rgb_images_with_a_fixed_stratified_split() -> None:
    data = DigitsDataModule(image_size=32, batch_size=64)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (1437, 360)
    images, labels = data.val_set.tensors
    assert images.shape == (360, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 2])  # grey level on three channels
    per_class = torch.bincount(labels, minlength=10)
    assert per_class.min() >= 35 and per_class.max() <= 37  # stratified: ~20 % of every class
    again = DigitsDataModule(image_size=32)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[1], labels)  # same split on every run / rank


def test_digits_loaders_and_random_shift() -> None:
    data = DigitsDataModule(image_size=16, batch_size=8, max_shift=2)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.long
    shifted, _ = data.train_set[0]
    assert shifted.shape == (3, 16, 16)
    assert data.num_classes == 10 and data.image_size == 16
    assert len(data.test_dataloader().dataset) == 360


# ----------------------------------------------------------------------------------- ImageNet


def write_image(path, color: tuple[int, int, int], size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()[:200]


@pytest.fixture
def image_root(tmp_path):
    """root/{train,val}/{a,b,c}/ with 4 train and 2 val images per class, two of them unreadable."""
    root = tmp_path / "imagenet"
    colors = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    for cls, color in colors.items():
        for i in range(4):
            write_image(root / "train" / cls / f"{i}.png", color)
        for i in range(2):
            write_image(root / "val" / cls / f"{i}.png", color)
    (root / "train" / "a" / "not_an_image.JPEG").write_bytes(b"this is not a JPEG")
    (root / "train" / "b" / "truncated.JPEG").write_bytes(truncated_jpeg())
    return root


def imagenet(root, **options) -> ImageNetDataModule:
    defaults = {
        "batch_size": 7,
        "num_workers": 0,
        "image_size": 32,
        "resize_size": 36,
        "pin_memory": False,
    }
    return ImageNetDataModule(str(root), **{**defaults, **options})


def test_unreadable_images_come_back_as_markers(image_root) -> None:
    dataset = SkipUnreadableImageFolder(image_root / "train")
    items = [dataset[i] for i in range(len(dataset))]
    skipped = [item for item in items if isinstance(item, SkippedImage)]
    assert len(items) == 14 and len(skipped) == 2
    assert {s.path.rsplit("/", 1)[-1] for s in skipped} == {"not_an_image.JPEG", "truncated.JPEG"}
    assert all(s.error for s in skipped)


def test_collate_drops_the_skipped_and_carries_their_paths() -> None:
    good = (torch.zeros(3, 4, 4), 1)
    batch = collate_skipping([good, SkippedImage("x.jpg", "OSError: broken"), good])
    assert batch.images.shape == (2, 3, 4, 4) and batch.targets.tolist() == [1, 1]
    assert batch.skipped == [("x.jpg", "OSError: broken")]
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        collate_skipping([SkippedImage("x.jpg", "OSError: broken")])


@pytest.mark.parametrize("workers", [0, 1])
def test_every_epoch_reads_past_bad_files_and_counts_them(image_root, workers: int) -> None:
    data = imagenet(image_root, num_workers=workers)
    data.setup("fit")
    assert data.num_classes == 3 and data.classes == ["a", "b", "c"]
    seen = 0
    for batch in data.train_dataloader():
        images, targets = data.on_before_batch_transfer(batch, 0)
        assert images.shape[1:] == (3, 32, 32) and len(images) == len(targets)
        seen += len(images)
    # 14 files in two full batches of 7 (the training loader drops a last partial batch).
    skipped = data.pop_skipped("train")
    assert len(skipped) == 2 and seen == 12
    assert data.pop_skipped("train") == []


def test_val_uses_the_training_labels(tmp_path) -> None:
    root = tmp_path / "subset"
    for cls in ("a", "b", "c"):
        write_image(root / "train" / cls / "0.png", (0, 0, 0))
    write_image(root / "val" / "c" / "0.png", (0, 0, 0))  # only class c in val
    data = imagenet(root)
    data.setup("validate")
    assert [target for _, target in data.val_set.samples] == [2]


class TinyClassifier(LightningModule):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = nn.functional.cross_entropy(self.net(images), targets)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(images), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_report_at_the_end_of_the_epoch_and_no_crash(image_root, tmp_path) -> None:
    data = imagenet(image_root)
    report = SkippedImagesReport()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match=r"train epoch 0: skipped 2 unreadable images"):
        trainer.fit(TinyClassifier(), datamodule=data)
    assert report.total["train"] == 4  # two epochs, two bad files each
    assert float(trainer.callback_metrics["data/skipped_images_train"]) == 2.0
    assert report.total["validate"] == 0


def test_without_the_report_the_data_module_still_tells(image_root, tmp_path) -> None:
    data = imagenet(image_root)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(), datamodule=data)
    assert any("skipped 2 unreadable images" in str(w.message) for w in caught)


def test_mixup_gives_soft_targets_in_training(image_root) -> None:
    data = imagenet(image_root, mixup_alpha=0.8, cutmix_alpha=1.0)
    data.setup("fit")

    class Training:
        training = True

    data.trainer = Training()
    _, targets = data.on_after_batch_transfer(
        (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])), 0
    )
    assert targets.shape == (4, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "has no 'train' folder"),
        (lambda root: ((root / "train").mkdir(parents=True), (root / "val").mkdir()), "is empty"),
    ],
)
def test_missing_or_empty_root_explains_the_layout(tmp_path, make, message) -> None:
    root = tmp_path / "imagenet"
    make(root)
    with pytest.raises(FileNotFoundError, match=message) as error:
        ImageNetDataModule(str(root))
    assert "train/n01440764" in str(error.value) and "extract_ILSVRC.sh" in str(error.value)


def test_no_root_at_all_explains_the_layout() -> None:
    with pytest.raises(FileNotFoundError, match="needs root="):
        ImageNetDataModule()


def test_class_folders_without_images_explain_the_layout(tmp_path) -> None:
    root = tmp_path / "imagenet"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        (root / "val" / cls).mkdir(parents=True)
    data = ImageNetDataModule(str(root))
    with pytest.raises(FileNotFoundError, match="Expected the ImageFolder layout"):
        data.setup("fit")
