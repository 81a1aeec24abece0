"""The three callbacks together on 2-process CPU DDP, with a plain LightningModule of this file.

The module is not ``KRClassifier``: it wraps ``kr_convert(resnet18(num_classes=4))`` and nothing else.
The fit runs once per session (``ddp_spawn``: spawned workers unpickle the module and callbacks; the
trained weights and ``callback_metrics`` come back to this process) and the tests read what it wrote.

Run as a script (``python tests/test_callbacks_ddp.py ROOT``) the same fit uses ``strategy="ddp"``,
whose launcher starts the second rank by re-running the script; ``test_subprocess_ddp_script`` does
that. Under pytest, ``strategy="ddp"`` would re-run the whole pytest command line in rank 1, so the
in-process tests use ``ddp_spawn``.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset
from torchvision.models import resnet18

from lightning_kr import kr_convert
from lightning_kr.callbacks import (
    AttentionMonitor,
    FlopsOverhead,
    KernelEmbeddings,
    TemperatureAnnealing,
)

NUM_CLASSES, SIZE, BATCH = 4, 32, 4
N_TRAIN, N_VAL = 16, 13  # 13 is odd: DistributedSampler pads rank 1 with a copy of sample 0
LABELS = torch.tensor([3, 1, 0, 2, 2, 0, 1, 3, 1, 0, 3, 2, 0, 1, 2, 3])


class NumberedImages(Dataset):
    """Image ``i`` is fixed by ``i`` alone: a class pattern plus noise seeded with ``i``."""

    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = LABELS[i % len(LABELS)]
        noise = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(self.offset + i))
        return noise + label.float() * torch.linspace(-1, 1, SIZE), label


class ConvertedResNet(pl.LightningModule):
    """A LightningModule of the user's own around a converted torchvision model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = kr_convert(resnet18(num_classes=NUM_CLASSES), input_size=SIZE)
        self.example_input_array = torch.zeros(2, 3, SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(root: Path, strategy: str) -> tuple[ConvertedResNet, pl.Trainer]:
    torch.manual_seed(0)
    model = ConvertedResNet()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        default_root_dir=root,
        logger=[CSVLogger(root), TensorBoardLogger(root)],
        callbacks=[
            FlopsOverhead(top_n=5),
            KernelEmbeddings(depths=[0, -1], layers=["layer4.1.conv2"], max_samples=100),
            TemperatureAnnealing(start=30.0, end=1.0, epochs=1),
            AttentionMonitor(max_batches=2, stats=("spread", "samples")),
        ],
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(
        model,
        DataLoader(NumberedImages(N_TRAIN, offset=1000), batch_size=BATCH, shuffle=True),
        DataLoader(NumberedImages(N_VAL), batch_size=BATCH),
    )
    if strategy == "ddp":
        trainer.save_checkpoint(root / "final.ckpt")
    return model, trainer


def read_metrics(root: Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` from the CSVLogger's metrics.csv."""
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    values: dict[str, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value:
                    values.setdefault(key, []).append((int(row["step"]), float(value)))
    return values


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model, trainer = fit(root, "ddp_spawn")
    return root, model, trainer


def check_callback_outputs(root: Path, model: ConvertedResNet) -> None:
    metrics = read_metrics(root)
    # FlopsOverhead: once, on rank zero, before the first step.
    for key in (
        "flops/static_gmacs",
        "flops/kr_gmacs",
        "flops/overhead_pct",
        "params/static_m",
        "params/kr_m",
    ):
        assert len(metrics[key]) == 1 and metrics[key][0][0] == 0, key
    static, kr = metrics["flops/static_gmacs"][0][1], metrics["flops/kr_gmacs"][0][1]
    assert 0 < static < kr
    assert metrics["flops/overhead_pct"][0][1] == pytest.approx(
        100 * (kr - static) / static, rel=1e-4
    )
    kr_params = sum(p.numel() for p in model.net.parameters()) / 1e6
    static_params = sum(p.numel() for p in model.net.to_static().parameters()) / 1e6
    assert metrics["params/kr_m"][0][1] == pytest.approx(kr_params, rel=1e-6)
    assert metrics["params/static_m"][0][1] == pytest.approx(static_params, rel=1e-6)

    # TemperatureAnnealing: 2 steps per epoch on each rank, 30 -> 1 over the first epoch.
    temperature = dict(metrics["kr/temperature"])
    assert temperature == pytest.approx({0: 30.0, 1: 15.5, 2: 1.0, 3: 1.0})
    assert float(model.net.temperature) == 1.0

    check_attention_monitor(metrics)

    # KernelEmbeddings: every validation epoch, files and scalars.
    for name in (
        "kernel_silhouette",
        "kernel_knn_purity",
        "feature_silhouette",
        "feature_knn_purity",
    ):
        assert len(metrics[f"embeddings/{name}"]) == 2
    purity = [v for _, v in metrics["embeddings/kernel_knn_purity"]]
    assert all(0.0 <= v <= 1.0 for v in purity)
    out = next(root.glob("lightning_logs/version_*/kernel_embeddings"))
    for epoch in (0, 1):
        assert (out / f"epoch_{epoch:03d}.npz").is_file()
        assert (out / f"tsne_epoch_{epoch:03d}.png").stat().st_size > 10_000


def check_attention_monitor(metrics: dict[str, list[tuple[int, float]]]) -> None:
    """Every validation epoch; the sums of both processes: 2 batches of 4 and 3 images each."""
    assert len(metrics["attention/median_spread"]) == 2
    samples = metrics["attention/layer1.0.conv1/channel/samples"]
    assert [value for _, value in samples] == [14.0, 14.0]
    spreads = [v for key, rows in metrics.items() if key.endswith("/spread") for _, v in rows]
    assert spreads and all(v >= 0 for v in spreads)


def check_each_sample_once(root: Path, model: ConvertedResNet) -> None:
    out = next(root.glob("lightning_logs/version_*/kernel_embeddings"))
    data = np.load(out / "epoch_001.npz")
    assert data["sample_index"].tolist() == list(range(N_VAL))  # padding removed, nothing missing
    assert data["labels"].tolist() == LABELS[:N_VAL].tolist()
    assert data["kernels"].shape[0] == data["features"].shape[0] == N_VAL
    # Each row is the right sample: d_0 depends on the image and the (synchronised) stem only.
    images = torch.stack([NumberedImages(N_VAL)[i][0] for i in range(N_VAL)])
    with torch.no_grad():
        d0 = model.net.eval().stem(images).numpy()
    np.testing.assert_allclose(data["kernels"][:, : d0.shape[1]], d0, atol=1e-5)
    assert len(np.unique(data["kernels"][:, : d0.shape[1]].round(5), axis=0)) == N_VAL


def test_all_callbacks_on_two_process_ddp(ddp_run):
    root, model, trainer = ddp_run
    check_callback_outputs(root, model)
    # ddp_spawn sends rank zero's callback_metrics back to this process.
    assert trainer.callback_metrics["kr/temperature"] == pytest.approx(1.0)
    metrics = read_metrics(root)
    for key in ("flops/kr_gmacs", "flops/overhead_pct"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(metrics[key][0][1], rel=1e-5)
    projector = next(root.glob("lightning_logs/version_*/projector_config.pbtxt")).read_text()
    assert "kernel_embeddings/kernels" in projector


def test_gathered_embeddings_hold_each_validation_sample_once(ddp_run):
    root, model, _ = ddp_run
    check_each_sample_once(root, model)  # asserts order, labels and d_0 of every row
    assert any(root.rglob("epoch_*.npz"))


@pytest.mark.slow
def test_subprocess_ddp_script(tmp_path):
    """``strategy="ddp"`` as users run it: a script whose launcher starts rank 1 itself."""
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = ConvertedResNet()
    state = torch.load(tmp_path / "final.ckpt", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    check_callback_outputs(tmp_path, model)
    check_each_sample_once(tmp_path, model)


if __name__ == "__main__":
    fit(Path(sys.argv[1]), "ddp")
