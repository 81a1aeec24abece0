"""The layout of an image-folder data root, checked before training: a clear error or usable files.

* :func:`class_folders` — ``root/train`` and ``root/val`` exist, two classes or more, and ``val``
  holds no class that ``train`` lacks (cheap: folders only, no file is listed).
* :func:`image_files` — the image files of one class folder, refusing symbolic links that loop or
  lead nowhere, never taking a directory named like an image for an image.

Both raise :class:`DataRootError`, whose message names the path and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

LAYOUT = """Expected the ImageFolder layout of ILSVRC-2012 (one folder per class, same names in both):
  {root}/train/n01440764/n01440764_10026.JPEG
  {root}/train/n01443537/...                      (1,000 class folders)
  {root}/val/n01440764/ILSVRC2012_val_00000293.JPEG
  {root}/val/n01443537/...
ImageNet's validation images come in one flat folder: sort them into class folders first, e.g. with
pytorch/examples' imagenet/extract_ILSVRC.sh. Without a root, `python recipes/imagenet.py fit`
trains on the embedded digits instead."""


class DataRootError(FileNotFoundError):
    """A data root that cannot be trained on as it is; the message names the path and what to do.

    A ``FileNotFoundError`` (what a missing root has always raised), raised before training starts.
    """


def _folders(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def class_folders(root: str | Path | None) -> list[str]:
    """The class names of ``root/train``, after checking the layout of ``root``.

    ``root/val`` may leave classes out (their labels still come from ``train``), not add any.

    Raises:
        DataRootError: with the expected layout, if ``root`` is not given, does not exist, lacks
            ``train`` or ``val``, ``train`` has no class folder or a single one, or ``val`` has
            class folders that ``train`` lacks.
    """
    if root is None:
        raise DataRootError("ImageNetDataModule needs root=... " + LAYOUT.format(root="ROOT"))
    root = Path(root).expanduser()
    layout = LAYOUT.format(root=root)
    if not root.is_dir():
        raise DataRootError(f"ImageNet root {root} does not exist or is not a folder. {layout}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataRootError(f"ImageNet root {root} has no '{split}' folder. {layout}")
    classes = _folders(root / "train")
    if not classes:
        raise DataRootError(f"{root / 'train'} is empty: it has no class folders. {layout}")
    if len(classes) == 1:
        raise DataRootError(
            f"{root / 'train'} has a single class folder ({classes[0]}): a classifier needs two "
            "classes or more; add one folder per class."
        )
    unknown = sorted(set(_folders(root / "val")) - set(classes))
    if unknown:
        raise DataRootError(
            f"{root / 'val'} has class folders that {root / 'train'} lacks ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}): give both the same class folders (val may "
            "leave some out)."
        )
    return classes


def image_files(folder: str | Path, is_image: Callable[[str], bool] | None = None) -> list[str]:
    """The image files in ``folder`` and its sub-folders (links followed), sorted by path.

    Args:
        folder: a class folder.
        is_image: which file paths to take; default: a name ending in one of torchvision's image
            extensions, in any case (``ImageFolder``'s rule). Directories are never taken, whatever
            their name (``x.jpg/`` is searched, not read).

    Raises:
        DataRootError: a folder cannot be listed; a symbolic link leads back to a folder that holds
            it (reading would never end); a link taken for an image leads nowhere.
    """
    keep = is_image or (lambda path: path.lower().endswith(IMG_EXTENSIONS))
    found: list[str] = []
    pending = [(os.fspath(folder), (os.path.realpath(folder),))]
    while pending:
        directory, above = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            raise DataRootError(
                f"{directory} cannot be listed ({error.strerror}): check that it is a folder you can "
                "read."
            ) from error
        for entry in entries:
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:  # a symbolic link to itself, or in a cycle of links: ELOOP
                is_dir = is_file = False
            if is_dir:
                target = os.path.realpath(entry.path)
                if target in above:
                    raise DataRootError(
                        f"{entry.path} is a symbolic link to {target}, a folder that holds it: "
                        "reading it would never end; remove the link."
                    )
                pending.append((entry.path, (*above, target)))
            elif keep(entry.path):
                if is_file:
                    found.append(entry.path)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    raise DataRootError(
                        f"{entry.path} is a symbolic link that leads nowhere (a loop, or its target "
                        "is missing): remove it or point it at an image."
                    )
    return sorted(found)
