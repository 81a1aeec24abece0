"""``KernelEmbeddings``: what it collects, where it writes, and how it fails."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_kr import kr_convert
from lightning_kr.callbacks import KernelEmbeddings
from lightning_kr.callbacks.kernel_embeddings import default_labels

N_VAL, NUM_CLASSES, SIZE, D = 24, 3, 16, 8


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, NUM_CLASSES),
    )


class Blobs(Dataset):
    """Class ``c`` images: a bright patch in corner ``c`` plus noise; ``as_dict`` for dict batches."""

    def __init__(self, size: int = N_VAL, as_dict: bool = False) -> None:
        self.size, self.as_dict = size, as_dict

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        label = i % NUM_CLASSES
        image = 0.3 * torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
        image[
            :, (label // 2) * 8 : (label // 2) * 8 + 8, (label % 2) * 8 : (label % 2) * 8 + 8
        ] += 2
        return {"image": image, "label": label} if self.as_dict else (image, label)


class LateClassifier(nn.Module):
    """``tiny_cnn`` with its classifier registered first: the last ``nn.Linear`` registered is the
    hidden layer (16 → 12), the one that runs last is ``fc`` (12 → classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, NUM_CLASSES)
        self.body = tiny_cnn()[:-1]

    def forward(self, x):
        return self.fc(self.body(x))


class Module(pl.LightningModule):
    """A LightningModule of the user's own; ``convert=False`` keeps the plain network."""

    def __init__(
        self, convert: bool = True, mode: str = "kr", net: nn.Module | None = None
    ) -> None:
        super().__init__()
        net = net or tiny_cnn()
        self.net = kr_convert(net, input_size=SIZE, repr_dim=D, mode=mode) if convert else net

    def forward(self, x):
        return self.net(x)

    def _batch(self, batch):
        return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch

    def training_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(module, callback, tmp_path, logger=None, epochs=1, as_dict=False) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=logger if logger is not None else False,
        callbacks=[callback],
        limit_train_batches=2,
        num_sanity_val_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(
        module,
        DataLoader(Blobs(16, as_dict), batch_size=8, shuffle=True),
        DataLoader(Blobs(N_VAL, as_dict), batch_size=10),
    )
    return trainer


def test_tensorboard_projector_tsne_png_and_scores(tmp_path):
    callback = KernelEmbeddings(every_n_epochs=2, depths=[0, -1], layers=r"4", max_samples=100)
    fit(Module(), callback, tmp_path, TensorBoardLogger(tmp_path), epochs=2)
    out = tmp_path / "lightning_logs" / "version_0"
    # Every 2nd validation epoch (sanity check not counted): only epoch 1.
    assert sorted(p.name for p in (out / "kernel_embeddings").iterdir()) == [
        "epoch_001.npz",
        "tsne_epoch_001.png",
    ]
    data = np.load(out / "kernel_embeddings" / "epoch_001.npz")
    assert data["sample_index"].tolist() == list(range(N_VAL))
    assert data["labels"].tolist() == [i % NUM_CLASSES for i in range(N_VAL)]
    # d_0 and d_L (D each), then layer "4"'s channel (16), filter (16) and spatial (9) attentions.
    assert data["kernels"].shape == (N_VAL, 2 * D + 16 + 16 + 9)
    assert data["features"].shape == (N_VAL, 12)  # the classifier's input
    assert set(callback.last["metrics"]) == {
        f"embeddings/{space}_{score}"
        for space in ("kernel", "feature")
        for score in ("silhouette", "knn_purity")
    }
    projector = (out / "projector_config.pbtxt").read_text()
    assert "kernel_embeddings/kernels" in projector and "kernel_embeddings/features" in projector
    assert "metadata.tsv" in projector
    events = EventAccumulator(str(out)).Reload()
    assert "kernel_embeddings/tsne" in events.Tags()["images"]
    assert "embeddings/kernel_knn_purity" in events.Tags()["scalars"]


def test_other_logger_gets_scalars_and_no_logger_gets_files(tmp_path):
    fit(Module(), KernelEmbeddings(max_samples=9), tmp_path / "csv", CSVLogger(tmp_path / "csv"))
    (metrics_csv,) = (tmp_path / "csv").glob("lightning_logs/version_0/metrics.csv")
    with metrics_csv.open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("embeddings/kernel_silhouette")]
    assert len(rows) == 1 and -1 <= float(rows[0]["embeddings/kernel_silhouette"]) <= 1
    png = tmp_path / "csv" / "lightning_logs" / "version_0" / "kernel_embeddings"
    assert (png / "tsne_epoch_000.png").is_file()
    assert np.load(png / "epoch_000.npz")["sample_index"].tolist() == list(range(9))  # the cap

    with pytest.warns(UserWarning, match="no logger"):
        fit(Module(), KernelEmbeddings(), tmp_path / "none", as_dict=True)
    assert (tmp_path / "none" / "kernel_embeddings" / "tsne_epoch_000.png").is_file()


def test_features_of_a_module_without_kr_layers(tmp_path):
    callback = KernelEmbeddings(depths=None, dirpath=tmp_path / "out")
    fit(Module(convert=False), callback, tmp_path)
    assert "kernels" not in callback.last and callback.last["features"].shape == (N_VAL, 12)
    with pytest.raises(MisconfigurationException, match="found no KRModel"):
        fit(Module(convert=False), KernelEmbeddings(), tmp_path)


def validate(module: pl.LightningModule, callback: KernelEmbeddings) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False
    )
    trainer.validate(module, DataLoader(Blobs(), batch_size=10))


def test_trainer_validate_alone(tmp_path):
    callback = KernelEmbeddings(depths=[1, 2], dirpath=tmp_path)
    validate(Module(), callback)
    assert callback.last["kernels"].shape == (N_VAL, 2 * D)
    assert (tmp_path / "tsne_epoch_000.png").is_file()


def test_features_are_the_input_of_the_classifier_in_the_report(tmp_path):
    module = Module(net=LateClassifier())
    assert module.net.report.classifier == "fc"
    callback = KernelEmbeddings(depths=None, dirpath=tmp_path)
    validate(module, callback)
    assert callback.last["features"].shape == (N_VAL, 12)  # fc's input, not the hidden layer's


def test_misuse_raises_with_a_fix(tmp_path):
    with pytest.raises(MisconfigurationException, match="matched no KR layer"):
        fit(Module(), KernelEmbeddings(layers=["layer9"]), tmp_path)
    with pytest.raises(MisconfigurationException, match="keeps no representation"):
        fit(Module(mode="odconv"), KernelEmbeddings(), tmp_path)
    with pytest.raises(MisconfigurationException, match="choose depths in that range"):
        fit(Module(), KernelEmbeddings(depths=[7]), tmp_path)
    with pytest.raises(MisconfigurationException, match="nothing to embed"):
        KernelEmbeddings(depths=None, features=False)
    with pytest.raises(MisconfigurationException, match="label_fn"):
        default_labels({"image": torch.zeros(2, 3, SIZE, SIZE)})


def test_attention_descriptors_of_an_ablation(tmp_path):
    callback = KernelEmbeddings(depths=None, layers=["2"], attentions=["spatial"])
    fit(Module(mode="odconv"), callback, tmp_path / "odconv")
    assert callback.last["kernels"].shape == (N_VAL, 9)
    kernels = callback.last["kernels"]
    assert ((kernels > 0) & (kernels < 2)).all()  # 2·sigmoid gates, 1 at initialisation
    assert kernels.std(axis=0).max() > 0, "the attentions vary from sample to sample"


def test_state_dict_keeps_the_epoch_cadence():
    callback = KernelEmbeddings(every_n_epochs=3)
    callback._val_epochs = 5
    restored = KernelEmbeddings(every_n_epochs=3)
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == {"val_epochs": 5}
