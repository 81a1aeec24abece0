"""``AttentionMonitor``: attention statistics logged every epoch, a table at the end, no logger needed.

Two-process DDP (the sums of both ranks) is tested in ``tests/test_callbacks_ddp.py``.
"""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_kr import kr_convert
from lightning_kr.callbacks import AttentionMonitor
from tests.reference import tiny_cnn


class Module(pl.LightningModule):
    def __init__(self, convert: bool = True) -> None:
        super().__init__()
        self.net = kr_convert(tiny_cnn(), input_size=8, kernel_num=2) if convert else tiny_cnn()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 12) -> DataLoader:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.arange(n) % 2), batch_size=3)


def fit(tmp_path, callback, *, validate: bool = True, logger=True, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path) if logger else False,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Module(), loader(), loader(9) if validate else None)
    return trainer


def logged(tmp_path) -> dict[str, list[float]]:
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    values: dict[str, list[float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("attention/") and value:
                    values.setdefault(key, []).append(float(value))
    return values


def test_logs_every_layer_and_kind_each_epoch_and_prints_a_table(tmp_path, capsys):
    monitor = AttentionMonitor(max_batches=2, stats=("spread", "saturated", "entropy", "samples"))
    fit(tmp_path, monitor)
    values = logged(tmp_path)
    assert len(values["attention/median_spread"]) == 2
    # The tiny CNN's second conv and first linear are KR (first layer, classifier stay static).
    for layer, kinds in {
        "1": ("channel", "filter", "spatial", "kernel"),
        "4": ("channel",),
    }.items():
        for kind in kinds:
            assert values[f"attention/{layer}/{kind}/samples"] == [6.0, 6.0]  # 2 batches of 3
            assert all(v >= 0 for v in values[f"attention/{layer}/{kind}/spread"])
    assert "attention/1/kernel/entropy" in values and "attention/1/channel/entropy" not in values
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    assert "KR attentions, epoch 1" in capsys.readouterr().out
    assert monitor.state_dict() == {"history": monitor.history}


def test_without_validation_it_measures_training_batches(tmp_path):
    monitor = AttentionMonitor(max_batches=3, stats=("samples",))
    fit(tmp_path, monitor, validate=False, epochs=1)
    assert logged(tmp_path)["attention/1/channel/samples"] == [9.0]


def test_without_a_logger_it_warns_once_and_still_reports(tmp_path):
    monitor = AttentionMonitor(max_batches=1)
    with pytest.warns(UserWarning, match="no logger") as record:
        fit(tmp_path, monitor, logger=False)
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert len(monitor.history) == 2 and monitor.last_rows


def test_misuse_raises_with_a_fix(tmp_path):
    with pytest.raises(MisconfigurationException, match=">= 1"):
        AttentionMonitor(max_batches=0)
    with pytest.raises(MisconfigurationException, match="unknown"):
        AttentionMonitor(stats=("variance",))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[AttentionMonitor()],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match="kr_convert"):
        trainer.fit(Module(convert=False), loader())
