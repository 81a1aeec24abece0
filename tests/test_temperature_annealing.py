"""``TemperatureAnnealing``: the schedule, what the KR layers see, logging, and resuming."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_kr import kr_convert
from lightning_kr.callbacks import TemperatureAnnealing
from lightning_kr.layers import KRConv2d
from tests.reference import tiny_cnn

BATCHES = 4  # training batches per epoch


class Module(pl.LightningModule):
    """Records the temperature every KR layer holds at each training step."""

    def __init__(self, extra_layer: bool = False) -> None:
        super().__init__()
        self.net = kr_convert(tiny_cnn(), input_size=8, kernel_num=2)
        # A KR layer outside any KRModel is annealed too.
        self.extra = KRConv2d(3, 3, 3, padding=1, repr_dim=0) if extra_layer else None
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        layers = [m for m in self.modules() if hasattr(m, "generator")]
        self.seen.append(sorted({float(m.generator.temperature) for m in layers}))
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data() -> DataLoader:
    x = torch.randn(2 * BATCHES, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.arange(2 * BATCHES) % 2), batch_size=2)


def trainer(tmp_path, callback, epochs, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        callbacks=[callback, *kwargs.pop("callbacks", [])],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_schedule():
    steps = TemperatureAnnealing(start=30, end=1, epochs=10)
    assert [steps.temperature_at(e) for e in (0, 2.5, 10, 12)] == [30, 22.75, 1, 1]
    epochs = TemperatureAnnealing(start=30, end=1, epochs=10, interval="epoch")
    assert epochs.temperature_at(2.5) == epochs.temperature_at(2) == 24.2


def test_every_kr_layer_follows_the_schedule_and_it_is_logged(tmp_path):
    module = Module(extra_layer=True)
    trainer(tmp_path, TemperatureAnnealing(start=9, end=1, epochs=1), epochs=2).fit(module, data())
    expected = [9, 7, 5, 3, 1, 1, 1, 1]  # linear over the 4 batches of the first epoch
    assert module.seen == [[t] for t in expected]  # one value shared by every layer
    (path,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    with path.open() as f:
        logged = [float(r["kr/temperature"]) for r in csv.DictReader(f) if r["kr/temperature"]]
    assert logged == expected


def test_resume_continues_the_schedule(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Module()
    schedule = TemperatureAnnealing(start=30, end=2, epochs=2)
    trainer(tmp_path, schedule, epochs=1, callbacks=[checkpoint]).fit(first, data())
    assert schedule.state_dict()["batches"] == BATCHES

    resumed, fresh = Module(), TemperatureAnnealing(start=30, end=2, epochs=2)
    trainer(tmp_path, fresh, epochs=2).fit(resumed, data(), ckpt_path=tmp_path / "ckpt/last.ckpt")
    full = Module()
    trainer(tmp_path / "full", TemperatureAnnealing(30, 2, 2), epochs=2).fit(full, data())
    assert resumed.seen == full.seen[BATCHES:]  # [16, 12.5, 9, 5.5], not a restart at 30
    assert fresh.state_dict()["batches"] == 2 * BATCHES
    assert float(resumed.net.temperature) == fresh.temperature == pytest.approx(5.5)


def test_misuse_raises_with_a_fix(tmp_path):
    with pytest.raises(MisconfigurationException, match="positive"):
        TemperatureAnnealing(start=0)
    with pytest.raises(MisconfigurationException, match="'step' or 'epoch'"):
        TemperatureAnnealing(interval="batch")
    plain = Module()
    plain.net = tiny_cnn()
    with pytest.raises(MisconfigurationException, match="found no KR layer"):
        trainer(tmp_path, TemperatureAnnealing(), epochs=1).fit(plain, data())


def test_changed_schedule_on_resume_warns():
    callback = TemperatureAnnealing(start=30, end=1, epochs=10)
    with pytest.warns(UserWarning, match="annealed with"):
        callback.load_state_dict({**callback.state_dict(), "epochs": 5.0, "batches": 7})
    assert callback.batches == 7
