"""``FlopsOverhead``: counts once per fit on rank zero, logs, prints, and says what it needs."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kr import kr_convert
from lightning_kr.callbacks import FlopsOverhead
from lightning_kr.utilities.mac_count import count_overhead
from tests.test_mac_count import Cumulative, tiny_cnn


class Classifier(pl.LightningModule):
    """A plain LightningModule around a converted model (not KRClassifier)."""

    def __init__(self, example: bool = True, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.net = kr_convert(tiny_cnn(), input_size=20)
        self.extra = extra
        if example:
            self.example_input_array = torch.zeros(2, 3, 20, 20)

    def forward(self, x):
        logits = self.net(x)
        return logits if self.extra is None else logits + self.extra(x).sum(1, keepdim=True)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module: pl.LightningModule, tmp_path, callback: FlopsOverhead) -> dict[str, float]:
    """Fit one step; the metrics written to the CSV log, and those left in callback_metrics."""
    data = TensorDataset(torch.randn(4, 3, 20, 20), torch.tensor([0, 1, 2, 3]))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    (path,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    with path.open() as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if v}
    for key in ("flops/kr_gmacs", "params/kr_m"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(logged[key], rel=1e-6)
    return logged


def test_callback_logs_the_overhead_and_prints_the_table(tmp_path, capsys):
    module = Classifier()
    callback = FlopsOverhead(top_n=3)
    metrics = _fit(module, tmp_path, callback)
    expected = count_overhead(module, torch.zeros(1, 3, 20, 20))
    assert metrics["flops/static_gmacs"] == pytest.approx(expected.static.gmacs, rel=1e-6)
    assert metrics["flops/kr_gmacs"] == pytest.approx(expected.kr.gmacs, rel=1e-6)
    assert metrics["flops/overhead_pct"] == pytest.approx(expected.overhead_pct, rel=1e-6)
    assert metrics["params/kr_m"] == pytest.approx(expected.kr.params / 1e6)
    assert metrics["params/static_m"] == pytest.approx(expected.static.params / 1e6)
    assert callback.result.kr.total == expected.kr.total
    printed = capsys.readouterr().out
    assert "KR overhead" in printed and "FFTStem" in printed


def test_callback_lists_unsupported_operators(tmp_path):
    module = Classifier(extra=Cumulative())
    with pytest.warns(UserWarning, match=r"aten::cumsum"):
        _fit(module, tmp_path, FlopsOverhead(input_size=20, print_table=False))


def test_input_size_or_example_input_is_required(tmp_path):
    with pytest.raises(MisconfigurationException, match="example_input_array"):
        _fit(Classifier(example=False), tmp_path, FlopsOverhead())
    with pytest.raises(MisconfigurationException, match="input_size"):
        FlopsOverhead(input_size=(3, 0))
    with pytest.raises(MisconfigurationException, match="no such submodule"):
        _fit(Classifier(), tmp_path, FlopsOverhead(module="backbone"))
