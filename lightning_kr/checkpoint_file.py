"""Checkpoint files written whole or not at all, and read whole or refused.

``torch.save`` writes a zip archive whose table of contents is at its end, and ``torch.load`` checks
no checksum: a file cut short by a kill or a full disk fails with an unhelpful ``OSError``, and a
damaged byte inside a tensor loads silently as a wrong weight. Lightning writes ``last.ckpt`` over
the previous one through a temporary file in the system's temp folder, which is a copy, not an
atomic rename, when that folder is on another file system.

* :func:`checkpoint_problem` — why a file is not a whole checkpoint (every member's CRC-32 read).
* :func:`check_checkpoint_file` — the same as :class:`CheckpointFileError`, with what to do.
* :func:`save_atomically` — write beside the target, flush to disk, rename over it.
* :class:`AtomicCheckpointIO` — Lightning's ``TorchCheckpointIO`` doing both.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"  # torch.save(..., _use_new_zipfile_serialization=False): a bare pickle


class CheckpointFileError(ValueError):
    """A checkpoint file is truncated or corrupt; the message names it and says what to do."""


def checkpoint_problem(path: _PATH) -> str | None:
    """Why the local file ``path`` is not a whole ``torch.save`` checkpoint, or ``None``.

    Reads the whole file: the zip archive's table of contents (at its end: missing when the file was
    cut short) and every member against the CRC-32 recorded for it. A file in the old pickle format
    has no table of contents and no checksums: ``None`` (``torch.load`` is its only check).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with path.open("rb") as file:
        head = file.read(4)
    if not zipfile.is_zipfile(path):
        if head == ZIP_MAGIC:
            return (
                f"it begins as a torch.save archive but its end, the archive's table of contents, "
                f"is missing ({size:,} bytes are there: the file was cut short)"
            )
        if head.startswith(PICKLE_MAGIC):
            return None
        return f"it is not a file written by torch.save ({size:,} bytes, starting {head!r})"
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                try:
                    with archive.open(member) as data:
                        while data.read(1 << 24):
                            pass
                except zipfile.BadZipFile as error:
                    if "CRC" in str(error) and member.CRC == 0:
                        continue  # written without checksums (torch.serialization.set_crc32_options)
                    return str(error)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_checkpoint_file(path: _PATH) -> None:
    """Raise :class:`CheckpointFileError` if the local file ``path`` is not a whole checkpoint.

    A path that is no local file (missing, a URL) is left to the loader's own error.

    Example::

        >>> check_checkpoint_file("runs/digits/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
    """
    if not is_local(path) or not Path(path).is_file():
        return
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointFileError(
            f"checkpoint {path} is truncated or corrupt: {problem}. Nothing was loaded from it; "
            "pass another checkpoint (the run's checkpoints/ folder keeps the best ones) or start "
            "again without --ckpt_path"
        )


def is_local(path: _PATH) -> bool:
    """Whether ``path`` is a file on this machine (not ``s3://...`` or another fsspec URL)."""
    return isinstance(url_to_fs(str(path))[0], LocalFileSystem)


def save_atomically(checkpoint: dict[str, Any], path: _PATH) -> None:
    """``torch.save(checkpoint, path)`` such that ``path`` holds either the old file or the whole new
    one, whenever the process is killed: written to a hidden file in the same folder, flushed to
    disk, then renamed over ``path`` (one ``rename``, atomic on a local file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk (not possible everywhere)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partial checkpoint in place of a whole one and never
    loads one: local files are written by :func:`save_atomically` and checked by
    :func:`check_checkpoint_file` before ``torch.load`` reads them (other URLs: Lightning's own way).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        check_checkpoint_file(path)
        return super().load_checkpoint(path, *args, **kwargs)
