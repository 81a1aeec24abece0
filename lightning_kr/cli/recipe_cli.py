"""``RecipeCLI``: a ``LightningCLI`` on which every standard Trainer flag works or is refused clearly."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

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
      :func:`~lightning_kr.cli.check_gpus`' message.

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
        return super()._instantiate_trainer(config, callbacks)
