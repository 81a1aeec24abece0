"""``AttentionMonitor``: log how dynamic every KR layer is, each epoch (as ``LearningRateMonitor`` logs)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from rich.console import Console
from rich.table import Table

from lightning_kr.diagnostics import AttentionStatistics, kernel_generators


class AttentionMonitor(Callback):
    """Statistics of the attentions every KR layer generates, logged every ``every_n_epochs``.

    During validation (eval mode, the held-out images) the attentions of the first ``max_batches``
    batches are accumulated by :class:`~lightning_kr.diagnostics.AttentionStatistics`; at the end
    of the epoch the sums of every DDP process are gathered (one ``all_gather`` on every rank) and
    rank zero logs, per KR layer and attention kind, ``attention/<layer>/<kind>/<stat>`` for the
    statistics in ``stats`` (``spread``: across-sample std / mean; ``saturated``; ``entropy`` of the
    kernel-number attention; ``mean``, ``min``, ``max``), plus ``attention/median_spread``. A run
    without validation batches is measured on its training batches instead (training mode). With no
    logger the callback warns once and still prints its table. At the end of fit rank zero prints a
    rich table of the last statistics (one row per layer and kind).

    Args:
        every_n_epochs: measure every this many epochs.
        max_batches: batches per measurement, per process.
        stats: which statistics to log per layer and kind (the median spread is always logged);
            ``samples`` is the number of samples measured, over every process.
        print_table: print the table at the end of fit.

    Raises:
        MisconfigurationException: non-positive ``every_n_epochs`` / ``max_batches``, an unknown
            statistic, or a ``LightningModule`` without KR layers.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_kr.callbacks import AttentionMonitor
        >>> trainer = Trainer(max_epochs=10, callbacks=[AttentionMonitor(max_batches=4)])
    """

    STATS = ("spread", "saturated", "entropy", "mean", "min", "max", "samples")

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_batches: int = 4,
        stats: tuple[str, ...] = ("spread", "saturated", "entropy"),
        print_table: bool = True,
    ) -> None:
        if every_n_epochs < 1 or max_batches < 1:
            raise MisconfigurationException(
                f"AttentionMonitor(every_n_epochs={every_n_epochs}, max_batches={max_batches}): "
                "both must be >= 1"
            )
        unknown = sorted(set(stats) - set(self.STATS))
        if unknown:
            raise MisconfigurationException(
                f"AttentionMonitor(stats=...): unknown {unknown}; choose from {list(self.STATS)}"
            )
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.stats = tuple(stats)
        self.print_table = print_table
        self.history: list[dict[str, float]] = []  # per measurement: epoch, median spread
        self.last_rows: list[dict[str, Any]] = []
        self._statistics: AttentionStatistics | None = None
        self._watch: Any = None
        self._batches = 0
        self._warned_no_logger = False

    # ------------------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not kernel_generators(pl_module):
            raise MisconfigurationException(
                f"AttentionMonitor found no KR layer in {type(pl_module).__name__}: convert its model "
                "with lightning_kr.kr_convert (or use KRClassifier with kr=KRConfig(...)), or remove "
                "the callback"
            )

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._stop()
        self._statistics = AttentionStatistics()
        self._watch = self._statistics.watch(pl_module)
        self._watch.__enter__()
        self._batches = 0

    def _stop(self) -> None:
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self._watch = None

    def _count_batch(self) -> None:
        self._batches += 1
        if self._batches >= self.max_batches:
            self._stop()

    # ------------------------------------------------------------------------ measuring
    @staticmethod
    def _has_validation(trainer: pl.Trainer) -> bool:
        return trainer.enable_validation and sum(trainer.num_val_batches) > 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self._start(pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if self._watch is not None:
            self._count_batch()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._statistics is not None and self._due(trainer):
            self._finish(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer) and not self._has_validation(trainer):
            self._start(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._watch is not None and not self._has_validation(trainer):
            self._count_batch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._statistics is not None
            and not self._has_validation(trainer)
            and self._due(trainer)
        ):
            self._finish(trainer, pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        local, self._statistics = self._statistics, None
        assert local is not None
        statistics = self._gather(trainer, pl_module, local)
        if statistics is None:
            return
        self.last_rows = statistics.rows()
        median = statistics.median_spread()
        self.history.append({"epoch": trainer.current_epoch, "median_spread": median})
        metrics = {"attention/median_spread": median}
        for row in self.last_rows:
            for stat in self.stats:
                if not (stat == "entropy" and math.isnan(row[stat])):
                    metrics[f"attention/{row['layer']}/{row['kind']}/{stat}"] = row[stat]
        self._log(trainer, metrics)

    @staticmethod
    def _gather(
        trainer: pl.Trainer, pl_module: pl.LightningModule, local: AttentionStatistics
    ) -> AttentionStatistics | None:
        """Every process's sums combined; the same keys on every rank (one model, same batches)."""
        tensors = local.as_tensors()
        if trainer.world_size == 1:
            return AttentionStatistics.merge_gathered({k: v[None] for k, v in tensors.items()})
        # Every rank takes part in the collectives, even one that measured nothing.
        count = torch.tensor([len(tensors)], device=pl_module.device)
        counts = pl_module.all_gather(count).flatten()
        if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
            rank_zero_warn(
                "AttentionMonitor: some processes measured no KR layer this epoch; nothing logged"
            )
            return None
        keys = sorted(tensors)
        sizes = [tensors[k].numel() for k in keys]
        flat = torch.cat([tensors[k] for k in keys]).to(pl_module.device)
        gathered = pl_module.all_gather(flat).reshape(trainer.world_size, -1).double().cpu()
        parts = gathered.split(sizes, dim=1)
        return AttentionStatistics.merge_gathered(dict(zip(keys, parts, strict=True)))

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if not trainer.loggers:
            if not self._warned_no_logger:
                rank_zero_warn(
                    "AttentionMonitor: the Trainer has no logger, so the attention statistics are "
                    "not logged (the table is still printed at the end of fit); pass a logger to "
                    "Trainer(logger=...) to record them"
                )
                self._warned_no_logger = True
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # --------------------------------------------------------------------------- report
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        if self.print_table and self.last_rows:
            self._print_table()

    @rank_zero_only
    def _print_table(self) -> None:
        last = self.history[-1]
        table = Table(
            title=f"KR attentions, epoch {last['epoch']}: median layer spread "
            f"{last['median_spread']:.4f} (across-sample std / mean; 0 = static)"
        )
        for column in ("layer", "kind", "mean", "min", "max", "spread", "saturated", "entropy"):
            table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
        for row in self.last_rows:
            entropy = "" if math.isnan(row["entropy"]) else f"{row['entropy']:.3f}"
            table.add_row(
                row["layer"],
                row["kind"],
                f"{row['mean']:.3f}",
                f"{row['min']:.3f}",
                f"{row['max']:.3f}",
                f"{row['spread']:.4f}",
                f"{row['saturated']:.1%}",
                entropy,
            )
        Console().print(table)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
