"""``TemperatureAnnealing``: anneal the attention temperature of every KR layer, as ODConv trains."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_kr.layers import KRLayer


class TemperatureAnnealing(Callback):
    """Anneal the KR attention temperature ``T`` linearly from ``start`` to ``end`` over ``epochs``.

    ODConv's recipe: ``T`` goes from 30 to 1 over the first 10 epochs, then stays at 1. The
    attention logits are divided by ``T``, so a high ``T`` starts every sample near the uniform
    mixture of candidates and lets the attentions sharpen as training proceeds.

    Before every training batch the temperature for the current point of training is set on every
    :class:`~lightning_kr.layers.KRLayer` of the ``LightningModule`` (those of a ``KRModel`` and any
    other) and logged as ``kr/temperature``. With ``interval="step"`` the temperature moves every
    batch (``T`` after ``k`` batches: ``start + (end - start) · min(k / (epochs · batches per epoch),
    1)``); with ``"epoch"`` it moves once per epoch. Progress is counted in training batches and
    saved in checkpoints, so a resumed run continues the schedule where it stopped. Every DDP rank
    computes the same value from the same progress; no collective is needed.

    Args:
        start: temperature at the first batch (ODConv: 30).
        end: temperature once annealing is over (1).
        epochs: length of the annealing, in epochs (ODConv: 10).
        interval: ``"step"`` (every batch) or ``"epoch"``.
        log: log ``kr/temperature`` every step (subject to ``log_every_n_steps``).

    Raises:
        MisconfigurationException: non-positive temperatures or epochs, an unknown ``interval``, or
            a ``LightningModule`` without KR layers.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_kr.callbacks import TemperatureAnnealing
        >>> trainer = Trainer(max_epochs=100, callbacks=[TemperatureAnnealing(30.0, 1.0, epochs=10)])
    """

    def __init__(
        self,
        start: float = 30.0,
        end: float = 1.0,
        epochs: float = 10,
        interval: Literal["step", "epoch"] = "step",
        log: bool = True,
    ) -> None:
        if start <= 0 or end <= 0:
            raise MisconfigurationException(
                f"TemperatureAnnealing(start={start}, end={end}): temperatures must be positive"
            )
        if epochs <= 0:
            raise MisconfigurationException(
                f"TemperatureAnnealing(epochs={epochs}) must be positive"
            )
        if interval not in ("step", "epoch"):
            raise MisconfigurationException(
                f"TemperatureAnnealing(interval={interval!r}) must be 'step' or 'epoch'"
            )
        self.start = float(start)
        self.end = float(end)
        self.epochs = float(epochs)
        self.interval = interval
        self.log = log
        self.batches = 0  # training batches already run, over the whole run (checkpointed)
        self.temperature = self.start
        self._restored = False
        self._layers: list[KRLayer] = []

    def temperature_at(self, epoch_progress: float) -> float:
        """``T`` after ``epoch_progress`` epochs of training."""
        if self.interval == "epoch":
            epoch_progress = math.floor(epoch_progress + 1e-9)
        fraction = min(max(epoch_progress / self.epochs, 0.0), 1.0)
        return self.start + (self.end - self.start) * fraction

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._layers = [m for m in pl_module.modules() if isinstance(m, KRLayer)]
        if not self._layers:
            raise MisconfigurationException(
                f"TemperatureAnnealing found no KR layer in {type(pl_module).__name__}: convert the "
                "model with lightning_kr.kr_convert, or remove the callback"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch = trainer.num_training_batches
        if not self._restored and trainer.current_epoch > 0 and math.isfinite(per_epoch):
            # Resumed from a checkpoint written without this callback: start from the epoch reached.
            self.batches = trainer.current_epoch * int(per_epoch)
        self._apply(self.temperature_at(self._epoch_progress(trainer)))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(self.temperature_at(self._epoch_progress(trainer)))
        self.batches += 1
        if self.log:
            pl_module.log(
                "kr/temperature", self.temperature, on_step=True, on_epoch=False, batch_size=1
            )

    def _epoch_progress(self, trainer: pl.Trainer) -> float:
        per_epoch = trainer.num_training_batches
        if not math.isfinite(per_epoch) or per_epoch <= 0:
            if self.interval == "step":
                rank_zero_warn(
                    "TemperatureAnnealing: the training dataloader has no length, so the temperature "
                    "moves once per epoch; give the dataloader a __len__ for per-step annealing"
                )
                self.interval = "epoch"
            return float(trainer.current_epoch)
        return self.batches / per_epoch

    def _apply(self, temperature: float) -> None:
        self.temperature = temperature
        for layer in self._layers:
            layer.set_temperature(temperature)

    def state_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "epochs": self.epochs,
            "interval": self.interval,
            "batches": self.batches,
            "temperature": self.temperature,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        schedule = {k: state_dict.get(k) for k in ("start", "end", "epochs", "interval")}
        mine = {
            "start": self.start,
            "end": self.end,
            "epochs": self.epochs,
            "interval": self.interval,
        }
        if schedule != mine:
            rank_zero_warn(
                f"TemperatureAnnealing: the checkpoint was annealed with {schedule}, this callback "
                f"has {mine}; continuing with this callback's schedule from the progress reached"
            )
        self.batches = int(state_dict.get("batches", 0))
        self.temperature = float(state_dict.get("temperature", self.start))
        self._restored = True
