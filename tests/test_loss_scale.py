"""``set_loss_scale``: the dynamism push keeps its weight when the loss is scaled before backward
(mixed precision's GradScaler, gradient accumulation); ``KRClassifier`` sets it by itself."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kr import KRClassifier, KRConv2d, set_loss_scale
from lightning_kr.diagnostics import kernel_generators


def push_gradient(layer: KRConv2d, x: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """The gradient of the channel head under a task loss of zero: the push alone."""
    set_loss_scale(layer, loss_scale)
    layer.zero_grad(set_to_none=True)
    (layer(x) * 0).sum().backward()
    return layer.generator.heads["channel"].weight.grad.clone()


def test_the_push_is_scaled_with_the_loss():
    torch.manual_seed(0)
    layer = KRConv2d(8, 8, 3, padding=1, repr_dim=0).train()
    layer.generator.randomise_heads({"channel": 0.1})  # varies a little: below the floor
    x = torch.randn(6, 8, 10, 10)
    unscaled = push_gradient(layer, x, 1.0)
    assert unscaled.abs().max() > 0
    # A GradScaler's 65,536 over 4 accumulation steps: unscaled again, the push is the same.
    scaled = push_gradient(layer, x, 65536 / 4)
    torch.testing.assert_close(scaled / (65536 / 4), unscaled)


def test_set_loss_scale_reads_a_grad_scaler_and_rejects_nonsense():
    model = nn.Sequential(KRConv2d(4, 4, 3, repr_dim=0), KRConv2d(4, 4, 3, repr_dim=0))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert set_loss_scale(model, scaler) == 2
    assert {g.loss_scale for g in kernel_generators(model).values()} == {1024.0}
    set_loss_scale(model, torch.amp.GradScaler("cpu", enabled=False))
    assert {g.loss_scale for g in kernel_generators(model).values()} == {1.0}
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive finite number"):
            set_loss_scale(model, bad)


class RecordLossScale(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[set[float], float]] = []

    def on_after_backward(self, trainer: Trainer, pl_module: KRClassifier) -> None:
        scales = {g.loss_scale for g in kernel_generators(pl_module).values()}
        self.seen.append((scales, trainer.precision_plugin.scaler.get_scale()))


def test_kr_classifier_sets_the_scale_of_16_mixed_and_accumulation(tmp_path):
    """Lightning's ``16-mixed`` runs a GradScaler (the Trainer gives the CPU bf16 instead, so the
    plugin is passed as a CUDA run builds it): the layers see its scale over the accumulation
    steps before every backward."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    classifier = KRClassifier(model, image_size=16, num_classes=4)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 16, 16), torch.arange(16) % 4), batch_size=4)
    record = RecordLossScale()
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[record],
    )
    trainer.fit(classifier, data)
    assert len(record.seen) == 4
    for scales, scale in record.seen:
        assert scales == {scale / 2}, (scales, scale)
