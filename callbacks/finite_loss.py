"""``StopOnNonFiniteLoss``: a NaN or infinite training loss stops the run before the weights take it."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite; the message says at which step and what to try."""


class StopOnNonFiniteLoss(Callback):
    """Stop training at the first NaN or infinite loss, before its backward pass and optimiser step.

    The weights stay those of the last finite step, and no checkpoint is written after the fault
    (``ModelCheckpoint`` saves at the end of an epoch or a validation, which the run never reaches):
    the last good checkpoint is never overwritten with NaN weights. Under DDP every process takes
    part in the decision (a collective call), so all stop together instead of waiting on a gradient
    reduction the faulty one never joins.

    Raises:
        NonFiniteLossError: naming the epoch, the step, the last checkpoint written, and the usual
            remedies.

    Example::

        >>> trainer = Trainer(callbacks=[StopOnNonFiniteLoss()])  # doctest: +SKIP
    """

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        values = loss.detach().float().flatten()
        values = values[~torch.isfinite(values)]
        shown = str(float(values[0])) if len(values) else "non-finite on another process"
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = (
            f"the last checkpoint, {checkpoint}, holds the weights before it"
            if checkpoint
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"training loss is {shown} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: training stopped before the weights took it and {kept}. "
            "Lower --model.lr, add --trainer.gradient_clip_val 1.0, or train in 32-true precision; "
            "resume with --ckpt_path."
        )
