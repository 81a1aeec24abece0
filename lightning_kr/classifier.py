"""``KRClassifier``: train any image classifier with KR layers (or as its static baseline) in Lightning."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_kr.checkpoint_file import check_checkpoint_file
from lightning_kr.config import KRConfig
from lightning_kr.convert import kr_convert
from lightning_kr.kr_model import KRModel
from lightning_kr.loss_scale import set_loss_scale
from lightning_kr.models import BUILDER_ATTRIBUTE, build_model, builder_record, insert_head_dropout
from lightning_kr.outputs import main_logits

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "step", "constant"]

# Parameters that DeiT-style AdamW recipes keep out of weight decay, besides biases and norms.
NO_DECAY_SUFFIXES = ("class_token", "pos_embedding", "cls_token", "pos_embed")


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule,
    milestone_steps: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
    warmup_start_factor: float = 0.0,
) -> float:
    """Learning-rate multiplier after ``step`` optimiser steps.

    Linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_steps``, then ``"cosine"`` (to
    ``min_factor`` at ``total_steps``), ``"step"`` (× ``gamma`` at each milestone) or ``"constant"``.
    """
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(step >= milestone for milestone in milestone_steps)
    return 1.0


class KRClassifier(LightningModule):
    """Image classification with a model converted by :func:`~lightning_kr.kr_convert` before training.

    The model is converted in ``__init__``, so the optimiser, DDP, checkpoints and Lightning's model
    summary all see the KR model. ``kr=None`` trains the unconverted model: the baseline row.
    Loss: cross-entropy with optional label smoothing (also with soft targets (B, K), as produced by
    Mixup / CutMix). Metrics: top-1 accuracy and, with more than 5 classes, top-5 accuracy, logged as
    ``{train,val,test}/acc_top1`` and ``.../acc_top5``; losses as ``{train,val,test}/loss``.

    Args:
        model: a builder name (``"resnet18"``, ``"mobilenet_v2_050"``, ``"vit_tiny"``, any
            torchvision classifier; see :func:`~lightning_kr.models.build_model`) or an ``nn.Module``
            mapping images (B, C, H, W) to logits (B, K).
        num_classes: ``K`` for a builder (default 1000). For a module it is read from its output and,
            if given, must agree.
        kr: the conversion options, a :class:`~lightning_kr.KRConfig` (or its fields as a dict, as
            read back from a checkpoint); ``None`` trains the static model. In YAML:
            ``kr: {kernel_num: 4, mode: odconv}`` or ``kr: null``.
        image_size: side of the training images; sets ``example_input_array`` (1, C, S, S), used by
            the probe pass of the conversion, by the model summary's FLOP count and by
            ``FlopsOverhead``.
        in_channels: ``C``.
        model_kwargs: further arguments of the builder (``dropout``, ``width_mult``...).
        head_dropout: dropout in front of the final classifier (ODConv's ``--dropout``); 0 = none.
        label_smoothing: of the cross-entropy.
        aux_loss_weight: weight of auxiliary logits (GoogLeNet / Inception in training).
        optimizer: ``"sgd"`` (ODConv's recipe) or ``"adamw"`` (DeiT's recipe for ViTs).
        lr: peak learning rate, for the global batch of the run (scale it with the batch).
        momentum, nesterov: SGD options.
        betas: AdamW options.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        decay_norm_and_bias: also decay biases, normalisation weights and ViT position embeddings /
            class token (``False`` in DeiT's recipe).
        schedule: ``"cosine"``, ``"step"`` or ``"constant"``, stepped every optimiser step.
        warmup_epochs: linear warm-up length (may be fractional; 0 = none).
        warmup_start_factor: learning rate at the first step, as a fraction of ``lr``.
        min_lr: final learning rate of the cosine schedule.
        milestones: epochs at which the ``"step"`` schedule multiplies the learning rate by ``gamma``.
        gamma: see ``milestones``.

    Example::

        >>> classifier = KRClassifier("resnet18", num_classes=10, kr=KRConfig(kernel_num=4), image_size=32)
        >>> classifier(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> trainer = Trainer(max_epochs=10)  # doctest: +SKIP
        >>> trainer.fit(classifier, datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | nn.Module = "resnet18",
        num_classes: int | None = None,
        kr: KRConfig | dict[str, Any] | None = KRConfig(),  # noqa: B008 (immutable)
        image_size: int = 224,
        in_channels: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        head_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.4,
        optimizer: Optimizer = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        decay_norm_and_bias: bool = True,
        schedule: Schedule = "cosine",
        warmup_epochs: float = 5.0,
        warmup_start_factor: float = 0.0,
        min_lr: float = 0.0,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        config = KRConfig(**kr) if isinstance(kr, dict) else kr
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {optimizer!r}")
        if schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant'; got {schedule!r}")
        if schedule == "step" and not milestones:
            raise ValueError("schedule='step' needs milestones (epochs), e.g. [30, 60, 90]")
        self.save_hyperparameters(
            ignore=["model", "kr"] if isinstance(model, nn.Module) else ["kr"]
        )
        # Plain data in the checkpoint (loads with weights_only=True); __init__ reads it back.
        self.hparams["kr"] = None if config is None else config.as_record()
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

        if isinstance(model, nn.Module):
            network = model
        else:
            network = build_model(
                model,
                num_classes or 1000,
                image_size=image_size,
                head_dropout=head_dropout,
                **(model_kwargs or {}),
            )
        if head_dropout > 0 and isinstance(model, nn.Module):
            insert_head_dropout(network, head_dropout)
            _record_head_dropout(network, head_dropout)
        if config is None:
            self.model: nn.Module = network
            outputs = _count_logits(network, self.example_input_array)
        else:
            self.model = kr_convert(
                network, config, input_size=image_size, in_channels=in_channels, inplace=True
            )
            if self.model.num_classes is None:
                raise ValueError(
                    "KRClassifier needs a model that returns class logits (B, K); this one returns "
                    f"{self.model.report.output}. Use kr_convert directly for other models."
                )
            outputs = self.model.num_classes
        if num_classes is not None and outputs != num_classes:
            raise ValueError(
                f"the model returns {outputs} logits but num_classes={num_classes}; build it with "
                f"{num_classes} classes or leave num_classes unset"
            )
        self.num_classes = outputs
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = self._metrics("train")
        self.val_metrics = self._metrics("val")
        self.test_metrics = self._metrics("test")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``LightningModule.load_from_checkpoint``; a local file truncated or corrupt on disk is
        refused with :class:`~lightning_kr.checkpoint_file.CheckpointFileError` before anything is
        read from it (``torch.load`` would fail obscurely or load a damaged weight silently)."""
        if isinstance(checkpoint_path, str | os.PathLike):
            check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _metrics(self, stage: str) -> MetricCollection:
        metrics = {"acc_top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=f"{stage}/")

    @property
    def kr_model(self) -> KRModel | None:
        """The :class:`~lightning_kr.KRModel`, or ``None`` for the static model (``kr=None``)."""
        return self.model if isinstance(self.model, KRModel) else None

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) → logits (B, K)."""
        return main_logits(self.model(images))

    def _loss(self, output: Any, targets: Tensor) -> Tensor:
        loss = self.criterion(main_logits(output), targets)
        if isinstance(output, tuple) and self.hparams.aux_loss_weight:
            aux = [o for o in output[1:] if isinstance(o, Tensor)]
            loss = loss + self.hparams.aux_loss_weight * sum(
                self.criterion(o, targets) for o in aux
            )
        return loss

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, targets = batch[0], batch[1]
        output = self.model(images)
        loss = self._loss(output, targets)
        self.train_metrics.update(main_logits(output).detach(), _hard(targets))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def on_before_backward(self, loss: Tensor) -> None:
        """Tell the KR layers how the loss was scaled for this backward (mixed precision's
        ``GradScaler``, divided by the gradient-accumulation steps), so the dynamism push keeps
        its weight against the task: see :func:`~lightning_kr.set_loss_scale`."""
        scale: float = 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
            scale = scaler.get_scale()
        set_loss_scale(self.model, scale / self.trainer.accumulate_grad_batches)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def _evaluate(self, batch: Sequence[Tensor], metrics: MetricCollection, stage: str) -> None:
        images, targets = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        metrics.update(logits, targets)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities (B, K) of a batch of images (or of ``(images, ...)``)."""
        images = batch if isinstance(batch, Tensor) else batch[0]
        return self(images).softmax(dim=-1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            exempt = parameter.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)
            (no_decay if exempt and not hp.decay_norm_and_bias else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))

        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            if hp.schedule == "cosine":
                raise MisconfigurationException(
                    "the cosine schedule needs a finite run: set trainer max_epochs or max_steps"
                )
            total_steps = 0
        total_steps = int(total_steps)
        batches = self.trainer.num_training_batches
        accumulate = self.trainer.accumulate_grad_batches
        steps_per_epoch = (
            math.ceil(batches / accumulate)
            if math.isfinite(batches) and batches > 0
            else max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        )
        warmup_steps = round(hp.warmup_epochs * steps_per_epoch)
        if warmup_steps >= total_steps > 0:
            warnings.warn(
                f"the warm-up ({hp.warmup_epochs} epochs = {warmup_steps} steps) lasts the whole run "
                f"({total_steps} steps); lower warmup_epochs",
                stacklevel=2,
            )
        factor = partial(
            lr_factor,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            schedule=hp.schedule,
            milestone_steps=[m * steps_per_epoch for m in hp.milestones or ()],
            gamma=hp.gamma,
            min_factor=hp.min_lr / hp.lr if hp.lr else 0.0,
            warmup_start_factor=hp.warmup_start_factor,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"},
        }


def _record_head_dropout(model: nn.Module, p: float) -> None:
    """Keep the builder record of ``model`` true after a dropout was put in front of its classifier:
    ``build_model(..., head_dropout=p)`` builds the same (a second dropout: nothing does)."""
    record = builder_record(model)
    if record is None:
        return
    if "head_dropout" in record["kwargs"]:
        delattr(model, BUILDER_ATTRIBUTE)
    else:
        record["kwargs"]["head_dropout"] = p


def _hard(targets: Tensor) -> Tensor:
    """Class indices (B,) of hard targets (B,) or of soft targets (B, K) (Mixup / CutMix)."""
    return targets.argmax(dim=-1) if targets.dim() > 1 else targets


@torch.no_grad()
def _count_logits(model: nn.Module, example: Tensor) -> int:
    """Number of logits ``K`` the model returns for ``example`` (run in eval mode, no_grad)."""
    training = model.training
    try:
        model.eval()
        output = main_logits(model(example))
    finally:
        model.train(training)
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise ValueError(
            "KRClassifier needs a model that returns logits (B, K) or a tuple whose first item is"
        )
    return output.shape[-1]
