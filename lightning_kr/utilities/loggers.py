"""Pictures and embeddings for the loggers of a ``Trainer`` that can show them.

Scalars go to every logger through ``log_metrics``; a picture and a point cloud need each logger's own
call. TensorBoard gets both (``add_image``, ``add_embedding`` for its projector), Weights & Biases the
picture (``log_image``); the other loggers get neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


def log_image(
    loggers: Iterable[Logger], key: str, image: np.ndarray, path: str | Path, step: int
) -> None:
    """A picture (H, W, 3) uint8, saved as the PNG ``path``, to the TensorBoard and W&B loggers."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)


def log_projector(
    loggers: Iterable[Logger], tag: str, points: np.ndarray, labels: np.ndarray, step: int
) -> None:
    """Points (N, E) with their labels (N,) as metadata to TensorBoard's embedding projector."""
    metadata = [str(int(c)) for c in labels]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_embedding(
                torch.from_numpy(points), metadata=metadata, global_step=step, tag=tag
            )
