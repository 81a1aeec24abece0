"""``lightning_kr.utilities.loggers``: pictures and projector points for the loggers that show them."""

from __future__ import annotations

import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_kr.utilities.loggers import log_image, log_projector


def test_tensorboard_gets_the_picture_and_the_points_other_loggers_nothing(tmp_path):
    tensorboard, csv = TensorBoardLogger(tmp_path), CSVLogger(tmp_path / "csv")
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    log_image([csv, tensorboard], "demo/picture", image, tmp_path / "unused.png", step=3)
    points, labels = np.random.default_rng(0).normal(size=(6, 4)), np.arange(6) % 2
    log_projector([csv, tensorboard], "demo/points", points, labels, step=3)
    tensorboard.experiment.flush()

    events = EventAccumulator(tensorboard.log_dir).Reload()
    (picture,) = events.Images("demo/picture")
    assert (picture.step, picture.width, picture.height) == (3, 12, 8)
    projector = (tmp_path / "lightning_logs" / "version_0" / "projector_config.pbtxt").read_text()
    assert "demo/points" in projector and "metadata.tsv" in projector
    assert not (tmp_path / "csv").exists()  # the CSV logger was given nothing to write
