"""``callbacks_for_flags``: the callbacks that a Trainer's flags leave room for.

Lightning refuses a ``ModelCheckpoint`` when ``enable_checkpointing=False``, a progress bar when
``enable_progress_bar=False``, and a ``LearningRateMonitor`` when there is no logger; a recipe that
puts these callbacks in by default would turn each of those flags into a crash. Here the flag wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import (
    DeviceStatsMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
)
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

NEEDS_LOGGER: tuple[type[Callback], ...] = (LearningRateMonitor, DeviceStatsMonitor)
"""Callbacks that Lightning refuses without a logger. A callback of any other class counts too when
its ``needs_logger`` attribute is true (``KernelEmbeddings`` without a ``dirpath``)."""


def needs_logger(callback: Callback) -> bool:
    """Whether ``callback`` only makes sense with a logger (see :data:`NEEDS_LOGGER`)."""
    return isinstance(callback, NEEDS_LOGGER) or getattr(callback, "needs_logger", False) is True


def has_logger(logger: Any) -> bool:
    """Whether a Trainer's ``logger`` argument gives it a logger (``None`` and ``True``: the default one)."""
    if logger is False:
        return False
    if isinstance(logger, Iterable) and not isinstance(logger, str | bytes):
        return any(True for _ in logger)
    return True


def callbacks_for_flags(
    callbacks: Sequence[Callback], options: Mapping[str, Any]
) -> list[Callback]:
    """``callbacks`` less those that the Trainer ``options`` switch off.

    * ``enable_checkpointing=False`` or ``fast_dev_run``: no ``ModelCheckpoint`` (fast_dev_run
      writes no checkpoint; Lightning 2.6 would still save a ``save_last`` one when training ends);
    * ``enable_progress_bar=False``: no progress bar; ``enable_model_summary=False``: no summary;
    * ``logger=False`` or ``fast_dev_run`` (whose logger writes nothing): no callback that
      :func:`needs_logger` (LR monitor, device stats, kernel embeddings without a folder of their
      own), with one warning.

    Args:
        callbacks: the callbacks meant for the Trainer.
        options: the Trainer's keyword arguments (missing keys take the Trainer's defaults).

    Example::

        >>> from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
        >>> callbacks = [ModelCheckpoint(), LearningRateMonitor()]
        >>> kept = callbacks_for_flags(callbacks, {"enable_checkpointing": False})
        >>> [type(callback).__name__ for callback in kept]
        ['LearningRateMonitor']
    """
    off: list[type[Callback]] = []
    if options.get("enable_checkpointing") is False or options.get("fast_dev_run"):
        off.append(ModelCheckpoint)
    if options.get("enable_progress_bar") is False:
        off.append(ProgressBar)
    if options.get("enable_model_summary") is False:
        off.append(ModelSummary)
    kept = [callback for callback in callbacks if not isinstance(callback, tuple(off))]
    fast_dev_run = bool(options.get("fast_dev_run"))
    if has_logger(options.get("logger")) and not fast_dev_run:
        return kept
    left_out = [callback for callback in kept if needs_logger(callback)]
    if left_out:
        names = ", ".join(sorted({type(callback).__name__ for callback in left_out}))
        why, fix = (
            ("--trainer.fast_dev_run writes no logs", "run without fast_dev_run")
            if fast_dev_run
            else ("the Trainer has no logger (--trainer.logger false)", "give it one")
        )
        rank_zero_warn(f"{names} left out: {why}; {fix} to get it back.")
    return [callback for callback in kept if callback not in left_out]
