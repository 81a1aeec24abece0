"""Bad data roots, each built in ``tmp_path``: read correctly, or refused before training with the path
and what to do; unreadable files skipped and counted exactly (issue 22, item 3)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch import nn

from lightning_kr.data import DataRootError, ImageNetDataModule, SkippedImagesReport, load_rgb
from lightning_kr.data.folder_layout import image_files

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, mode: str = "RGB", color=(200, 30, 60), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def good_root(root: Path, classes=("a", "b"), train: int = 3, val: int = 1) -> Path:
    for cls in classes:
        for i in range(train):
            write_image(root / "train" / cls / f"{i}.png")
        for i in range(val):
            write_image(root / "val" / cls / f"{i}.png")
    return root


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()[:200]


# ------------------------------------------------------------------- refused, with path and fix


def _missing(root: Path) -> None:
    pass


def _no_train(root: Path) -> None:
    good_root(root)
    for path in sorted((root / "train").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "train").rmdir()


def _no_val(root: Path) -> None:
    good_root(root)
    for path in sorted((root / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "val").rmdir()


def _val_has_other_classes(root: Path) -> None:
    good_root(root)
    write_image(root / "val" / "zebra" / "0.png")


def _single_class(root: Path) -> None:
    good_root(root, classes=("a",))


def _one_empty_class_folder(root: Path) -> None:  # the table: train/ holds one empty folder
    (root / "train" / "a").mkdir(parents=True)
    (root / "val").mkdir()


def _no_class_folder(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    write_image(root / "train" / "loose.png")  # an image, but not in a class folder


@pytest.mark.parametrize(
    ("make", "message", "named"),
    [
        (_missing, "does not exist or is not a folder", ""),
        (_no_train, "has no 'train' folder", ""),
        (_no_val, "has no 'val' folder", ""),
        (_val_has_other_classes, r"class folders that .*train lacks \(zebra\)", "val"),
        (_single_class, r"single class folder \(a\): a classifier needs two", "train"),
        (_one_empty_class_folder, r"single class folder \(a\)", "train"),
        (_no_class_folder, "it has no class folders", "train"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_a_root_of_the_wrong_shape_is_refused_when_the_data_module_is_built(
    tmp_path, make: Callable[[Path], None], message: str, named: str
) -> None:
    root = tmp_path / "root"
    make(root)
    with pytest.raises(DataRootError, match=message) as error:
        ImageNetDataModule(str(root), num_workers=0)
    assert str(root / named).rstrip("/") in str(error.value)  # names the path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "train" / "b").mkdir(), r"1 class folder\(s\) hold no images"),
        (
            lambda root: (
                [p.unlink() for p in root.rglob("*.png")]
                + [(root / "train" / c / "notes.txt").write_text("x") for c in ("a", "c")]
            ),
            "holds no images in its class folders",
        ),
    ],
    ids=["empty_class_folder", "no_image_at_all"],
)
def test_a_class_folder_without_images_is_refused_at_setup(tmp_path, make, message) -> None:
    root = good_root(tmp_path / "root", classes=("a", "c"))
    make(root)
    data = ImageNetDataModule(str(root), num_workers=0)
    with pytest.raises(DataRootError, match=message) as error:
        data.setup("fit")
    assert str(root / "train") in str(error.value)
    assert "put the class's images" in str(error.value) or "ImageFolder layout" in str(error.value)


def test_val_without_images_is_refused(tmp_path) -> None:
    root = good_root(tmp_path / "root")
    for path in (root / "val").rglob("*.png"):
        path.unlink()
    data = ImageNetDataModule(str(root), num_workers=0)
    with pytest.raises(DataRootError, match=r"val holds no images: put each class's validation"):
        data.setup("validate")


def test_val_may_leave_classes_out(tmp_path) -> None:
    root = good_root(tmp_path / "root", classes=("a", "b", "c"))
    for path in (root / "val" / "a").iterdir():
        path.unlink()
    (root / "val" / "a").rmdir()
    data = ImageNetDataModule(str(root), num_workers=0)
    data.setup("validate")
    assert data.num_classes == 3 and {label for _, label in data.val_set.samples} == {1, 2}


def test_a_symbolic_link_loop_is_refused_with_its_path(tmp_path) -> None:
    root = good_root(tmp_path / "root")
    loop = root / "train" / "a" / "again"
    os.symlink(root / "train", loop)  # train/a/again -> train: a folder that holds it
    data = ImageNetDataModule(str(root), num_workers=0)
    with pytest.raises(DataRootError, match=r"a folder that holds it: .* remove the link") as error:
        data.setup("fit")
    assert str(loop) in str(error.value)


def test_a_link_named_like_an_image_that_leads_nowhere_is_refused(tmp_path) -> None:
    folder = tmp_path / "a"
    write_image(folder / "0.png")
    os.symlink(folder / "self.jpg", folder / "self.jpg")  # loops on itself
    with pytest.raises(DataRootError, match=r"self\.jpg is a symbolic link that leads nowhere"):
        image_files(folder)


def test_a_directory_named_like_an_image_is_searched_not_read(tmp_path) -> None:
    folder = tmp_path / "a"
    write_image(folder / "0.png")
    write_image(folder / "album.JPEG" / "1.png")  # a folder called album.JPEG, one image inside
    (folder / "empty.jpg").mkdir()
    assert image_files(folder) == [str(folder / "0.png"), str(folder / "album.JPEG" / "1.png")]


# ------------------------------------------------------------------- colour modes, read as RGB


def _cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path.with_suffix(".jpg"))


@pytest.mark.parametrize(
    ("name", "make", "expected", "tolerance"),
    [
        ("grey.png", lambda p: Image.new("L", (8, 8), 90).save(p), (90, 90, 90), 0),
        ("grey_alpha.png", lambda p: Image.new("LA", (8, 8), (90, 10)).save(p), (90, 90, 90), 0),
        (
            "grey16.png",
            lambda p: Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(p),
            (128, 128, 128),
            0,
        ),
        (
            "rgba.png",
            lambda p: Image.new("RGBA", (8, 8), (200, 30, 60, 0)).save(p),
            (200, 30, 60),
            0,
        ),
        ("palette.png", lambda p: Image.new("P", (8, 8), 0).save(p, transparency=0), (0, 0, 0), 0),
        ("cmyk.jpg", lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p), (255, 0, 0), 8),
        (
            "ycbcr.jpg",
            lambda p: Image.new("RGB", (8, 8), (20, 120, 220)).save(p),
            (20, 120, 220),
            8,
        ),
    ],
)
def test_every_colour_mode_is_read_as_8_bit_rgb(tmp_path, name, make, expected, tolerance) -> None:
    path = tmp_path / name
    make(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 8)
    pixel = np.asarray(image)[4, 4].astype(int)
    assert np.abs(pixel - np.array(expected)).max() <= tolerance, (Image.open(path).mode, pixel)


def test_a_16_bit_png_keeps_its_range_instead_of_clipping(tmp_path) -> None:
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    grey = np.asarray(load_rgb(tmp_path / "ramp.png"))[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.flatten()) >= 0) and len(np.unique(grey)) == 64  # no clipping


# ------------------------------------------------------------------- skipped, counted exactly


class TinyClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return nn.functional.cross_entropy(self.net(images), targets)

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(images), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_truncated_and_empty_files_are_skipped_and_counted_exactly(tmp_path) -> None:
    """8 training files (2 unreadable) in 2 full batches of 4, 4 validation files (1 unreadable),
    every colour mode among the readable ones, a folder named like an image: 2 epochs."""
    root = tmp_path / "root"
    write_image(root / "train" / "a" / "0.png")
    write_image(root / "train" / "a" / "grey.png", "L", 40)
    write_image(root / "train" / "a" / "rgba.png", "RGBA", (1, 2, 3, 4))
    (root / "train" / "a" / "truncated.jpg").write_bytes(truncated_jpeg())
    write_image(root / "train" / "b" / "0.png")
    write_image(root / "train" / "b" / "cmyk.jpg", "CMYK", (0, 0, 0, 0))
    Image.fromarray(np.full((10, 12), 1000, np.uint16)).save(root / "train" / "b" / "grey16.png")
    (root / "train" / "b" / "empty.JPEG").write_bytes(b"")
    (root / "train" / "b" / "folder.png").mkdir()  # not an image, not counted
    write_image(root / "val" / "a" / "0.png")
    write_image(root / "val" / "b" / "0.png")
    write_image(root / "val" / "b" / "1.png", "P", 3)
    (root / "val" / "a" / "zero_bytes.png").write_bytes(b"")
    data = ImageNetDataModule(
        str(root), batch_size=4, num_workers=0, image_size=16, resize_size=16, pin_memory=False
    )
    report = SkippedImagesReport()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[report],
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="skipped") as caught:
        trainer.fit(TinyClassifier(), datamodule=data)
    assert len(data.train_set) == 8 and len(data.val_set) == 4
    assert (report.total["train"], report.total["validate"]) == (2 * 2, 2 * 1)
    assert float(trainer.callback_metrics["data/skipped_images_train"]) == 2.0
    assert float(trainer.callback_metrics["data/skipped_images_val"]) == 1.0
    text = "\n".join(str(w.message) for w in caught)
    for name in ("truncated.jpg", "empty.JPEG", "zero_bytes.png"):
        assert name in text  # each unreadable file reported by its path
    assert trainer.global_step == 4  # every batch trained on its readable images


# ------------------------------------------------------------------- through the recipe


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    monkeypatch.setattr(sys, "argv", ["recipes/imagenet.py"])
    threads = torch.get_num_threads()
    import imagenet

    yield imagenet
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist or is not a folder"),
        (_one_empty_class_folder, "single class folder (a)"),
        (
            lambda root: (good_root(root), (root / "train" / "empty").mkdir()),
            "class folder(s) hold no images",
        ),
    ],
    ids=["missing_root", "one_empty_class_folder", "an_empty_class_folder_among_others"],
)
def test_the_recipe_refuses_a_bad_root_in_one_line_without_traceback(
    recipe, tmp_path, capsys, make, message
) -> None:
    root = tmp_path / "root"
    make(root)
    printed = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(printed):
        recipe.main(
            [
                "fit",
                f"--data.root={root}",
                "--data.image_size=16",
                "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[]",
                "--flops.print_table=false",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            ]
        )
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("imagenet.py: error: ") and message in error
    assert "Traceback" not in error and str(root) in error
