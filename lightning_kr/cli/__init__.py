"""What the recipes' command lines share: Trainer flags honoured, GPUs checked, user errors in a line.

* :func:`callbacks_for_flags` — the callbacks that the Trainer's flags leave room for.
* :func:`check_gpus` — a GPU run on a machine without those GPUs is refused with the flags to change.
* :func:`exit_on_user_error` — a user's mistake as ``prog: error: ...`` and exit status 2.
* :func:`fit_to_machine` — a recipe row written for 8 GPUs on this machine, its lr scaled.
* :class:`RecipeCLI` — ``LightningCLI`` with the first two built in.
"""

from lightning_kr.cli.gpus import available_gpus, check_gpus, requested_devices
from lightning_kr.cli.machine import MachineFit, fit_to_machine, given_keys
from lightning_kr.cli.recipe_cli import RecipeCLI
from lightning_kr.cli.trainer_flags import (
    NEEDS_LOGGER,
    callbacks_for_flags,
    has_logger,
    needs_logger,
)
from lightning_kr.cli.user_errors import USER_ERRORS, exit_on_user_error

__all__ = [
    "NEEDS_LOGGER",
    "USER_ERRORS",
    "MachineFit",
    "RecipeCLI",
    "available_gpus",
    "callbacks_for_flags",
    "check_gpus",
    "exit_on_user_error",
    "fit_to_machine",
    "given_keys",
    "has_logger",
    "needs_logger",
    "requested_devices",
]
