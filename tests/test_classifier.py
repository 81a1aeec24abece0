"""KRClassifier: conversion before training, metrics, loss, optimiser and schedule, by example."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kr import KRConfig, KRModel
from lightning_kr.classifier import KRClassifier, insert_head_dropout, lr_factor
from lightning_kr.layers import KRLayer
from lightning_kr.models import build_model


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Images (B, 3, 16, 16) → logits (B, K)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def loader(num_classes: int = 10, n: int = 16, size: int = 16, batch: int = 8) -> DataLoader:
    images = torch.randn(n, 3, size, size)
    labels = torch.arange(n) % num_classes
    return DataLoader(TensorDataset(images, labels), batch_size=batch)


def fit(classifier: KRClassifier, tmp_path, **trainer_options) -> Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    trainer = Trainer(**{**options, **trainer_options})
    trainer.fit(classifier, loader(classifier.num_classes), loader(classifier.num_classes))
    return trainer


def test_builder_name_is_converted_before_training() -> None:
    classifier = KRClassifier("resnet18", num_classes=10, image_size=32, kr=KRConfig(kernel_num=4))
    assert isinstance(classifier.model, KRModel)
    assert classifier.kr_model.config.kernel_num == 4
    assert classifier.example_input_array.shape == (1, 3, 32, 32)
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert classifier.hparams.model == "resnet18" and classifier.hparams.kr["kernel_num"] == 4


def test_static_mode_is_the_unconverted_baseline() -> None:
    classifier = KRClassifier(small_cnn(), image_size=16, kr=None)
    assert classifier.kr_model is None
    assert not any(isinstance(m, KRLayer) for m in classifier.modules())
    assert sum(p.numel() for p in classifier.model.parameters()) == sum(
        p.numel() for p in small_cnn().parameters()
    )


@pytest.mark.parametrize("mode", ["kr", "odconv", "dyconv"])
def test_module_is_converted_with_the_chosen_ablation(mode: str) -> None:
    classifier = KRClassifier(small_cnn(7), image_size=16, kr={"mode": mode})
    assert classifier.num_classes == 7
    assert classifier.kr_model.config.mode == mode
    assert (classifier.kr_model.stem is not None) == (mode == "kr")
    assert "model" not in classifier.hparams  # the module itself is saved in the state dict


def test_num_classes_must_agree_with_the_module() -> None:
    with pytest.raises(ValueError, match="returns 10 logits but num_classes=5"):
        KRClassifier(small_cnn(10), num_classes=5, image_size=16)


def test_unknown_builder_says_what_exists() -> None:
    with pytest.raises(ValueError, match="vit_tiny"):
        KRClassifier("resnet_nineteen", image_size=16)


def test_top5_only_with_more_than_five_classes() -> None:
    assert "acc_top5" in KRClassifier(small_cnn(10), image_size=16).val_metrics
    assert "acc_top5" not in KRClassifier(small_cnn(5), image_size=16).val_metrics


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_soft_targets_train_with_label_smoothing() -> None:
    classifier = KRClassifier(small_cnn(), image_size=16, label_smoothing=0.1)
    images = torch.randn(4, 3, 16, 16)
    soft = torch.softmax(torch.randn(4, 10), dim=-1)
    loss = classifier.training_step((images, soft), 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    accuracy = classifier.train_metrics.compute()["train/acc_top1"]
    assert 0.0 <= float(accuracy) <= 1.0


def test_head_dropout_goes_in_front_of_the_classifier() -> None:
    model = insert_head_dropout(small_cnn(), 0.2)
    head = model[-1]
    assert isinstance(head, nn.Sequential) and isinstance(head[0], nn.Dropout)
    assert head[0].p == 0.2 and isinstance(head[1], nn.Linear)


def test_lr_factor_warmup_cosine_and_step() -> None:
    cosine = {"warmup_steps": 10, "total_steps": 110, "schedule": "cosine"}
    assert lr_factor(0, **cosine) == pytest.approx(0.1)
    assert lr_factor(9, **cosine) == pytest.approx(1.0)
    assert lr_factor(60, **cosine) == pytest.approx(0.5)
    assert lr_factor(110, **cosine) == pytest.approx(0.0, abs=1e-12)
    step = {"warmup_steps": 0, "total_steps": 100, "schedule": "step", "milestone_steps": [30, 60]}
    assert [lr_factor(s, **step) for s in (29, 30, 60)] == pytest.approx([1.0, 0.1, 0.01])


def test_fit_logs_metrics_and_steps_the_schedule(tmp_path) -> None:
    classifier = KRClassifier(
        small_cnn(), image_size=16, lr=0.1, schedule="cosine", warmup_epochs=1, min_lr=0.01
    )
    trainer = fit(classifier, tmp_path, max_epochs=2)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/acc_top1", "val/acc_top5", "train/acc_top1"):
        assert key in metrics and math.isfinite(float(metrics[key]))
    # 2 batches per epoch: warm-up over the first epoch, cosine to min_lr over the second.
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_adamw_keeps_norms_and_biases_out_of_weight_decay(tmp_path) -> None:
    classifier = KRClassifier(
        small_cnn(),
        image_size=16,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.05,
        decay_norm_and_bias=False,
        schedule="constant",
        warmup_epochs=0,
    )
    trainer = fit(classifier, tmp_path, max_steps=1)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim <= 1 for p in exempt["params"])


def test_step_schedule_needs_milestones() -> None:
    with pytest.raises(ValueError, match="milestones"):
        KRClassifier(small_cnn(), image_size=16, schedule="step")


def test_checkpoint_round_trip(tmp_path) -> None:
    classifier = KRClassifier("resnet18", num_classes=10, image_size=32, kr=KRConfig(kernel_num=2))
    path = tmp_path / "model.ckpt"
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(classifier)
    trainer.save_checkpoint(path)
    restored = KRClassifier.load_from_checkpoint(path, weights_only=True)
    assert restored.kr_model.config.as_record() == classifier.kr_model.config.as_record()
    images = torch.randn(2, 3, 32, 32)
    classifier.eval()
    restored.eval()
    torch.testing.assert_close(restored(images), classifier(images))


@pytest.mark.parametrize(
    ("name", "millions"),
    [("vit_tiny", 5.72), ("mobilenet_v2_050", 1.97), ("resnet18", 11.69)],
)
def test_builders_of_the_poster_rows(name: str, millions: float) -> None:
    model = build_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


def test_vit_tiny_is_patch16_width192_depth12_heads3() -> None:
    vit = build_model("vit_tiny", num_classes=10, image_size=32)
    assert (vit.patch_size, vit.hidden_dim, vit.image_size) == (16, 192, 32)
    assert len(vit.encoder.layers) == 12
    assert vit.encoder.layers[0].self_attention.num_heads == 3


@pytest.mark.parametrize("name", ["vit_tiny", "mobilenet_v2_050"])
def test_poster_architectures_train_as_kr_models(name: str) -> None:
    classifier = KRClassifier(name, num_classes=10, image_size=32, kr=KRConfig(mode="odconv"))
    loss = classifier.criterion(classifier(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in classifier.parameters())  # DDP needs no unused ones
