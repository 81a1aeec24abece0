"""``RecipeCLI``: a ``LightningCLI`` on which every standard Trainer flag works or is refused clearly."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_kr.callbacks import CheckpointOnSigterm
from lightning_kr.checkpoint_file import AtomicCheckpointIO, check_checkpoint_file
from lightning_kr.cli.gpus import check_gpus
from lightning_kr.cli.trainer_flags import callbacks_for_flags


class RecipeCLI(LightningCLI):
    """``LightningCLI`` whose callbacks give way to the Trainer's flags, and that refuses a GPU run on
    a machine without those GPUs before building anything.

    * the callbacks of the config and of the callback groups (``parser.add_lightning_class_args``)
      pass through :func:`~lightning_kr.cli.callbacks_for_flags`: ``--trainer.enable_checkpointing
      false`` drops a recipe's ``ModelCheckpoint``, ``--trainer.logger false`` its LR monitor (one
      warning), and so on;
    * ``--trainer.accelerator gpu`` without GPUs, or more ``--trainer.devices`` than GPUs, stops with
      :func:`~lightning_kr.cli.check_gpus`' message;
    * checkpoints are written whole or not at all and a truncated or corrupt one is refused before
      anything is read from it (:class:`~lightning_kr.checkpoint_file.AtomicCheckpointIO`, raising
      :class:`~lightning_kr.checkpoint_file.CheckpointFileError`); a ``fit`` stopped by SIGTERM
      saves ``last.ckpt`` first (:class:`~lightning_kr.callbacks.CheckpointOnSigterm`).

    Example::

        >>> class MyCLI(RecipeCLI):  # doctest: +SKIP
        ...     def add_arguments_to_parser(self, parser): ...
    """

    gpu_hint: str = ""
    """A sentence added to the GPU refusal (e.g. how the recipe's learning rate scales)."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None:
            check_gpus(
                trainer.get("accelerator"),
                trainer.get("devices"),
                trainer.get("num_nodes") or 1,
                self.gpu_hint,
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if "callbacks" in config:
            given = config["callbacks"]
            given = [] if given is None else given if isinstance(given, list) else [given]
            config["callbacks"] = callbacks_for_flags([*given, *callbacks], config)
            callbacks = []
        trainer = super()._instantiate_trainer(config, callbacks)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.checkpoint_callback is not None:
            trainer.callbacks.append(CheckpointOnSigterm())
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the model's hyper-parameters from a --ckpt_path file here, before the
        # Trainer loads it: refuse a damaged file before either reads from it.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path:
            check_checkpoint_file(path)
        super()._parse_ckpt_path()
