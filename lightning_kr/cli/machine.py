"""``fit_to_machine``: a recipe row written for 8 GPUs, run on the machine at hand.

A row of the poster fixes its hyper-parameters for one global batch (8 GPUs x the per-GPU batch).
On another machine the same row keeps every hyper-parameter but the learning rate, which is scaled
by the new global batch over the row's (the linear scaling rule the configs' comments give), and the
Trainer takes what Lightning's ``auto`` finds: the GPUs there are, else one CPU process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_kr.cli.gpus import available_gpus, requested_devices

AUTO_TRAINER = ("accelerator", "devices", "strategy", "precision")
"""The Trainer settings that follow the machine unless given on the command line."""


def given_keys(args: list[Any]) -> set[str]:
    """The dotted keys of the options in a command line (``init_args`` left out).

    Example::

        >>> sorted(given_keys(["fit", "--trainer.devices=2", "--data.init_args.root", "/d"]))
        ['data.root', 'trainer.devices']
    """
    keys = set()
    for arg in args:
        if isinstance(arg, str) and arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            keys.add(key.replace(".init_args.", "."))
    return keys


def machine_accelerator(accelerator: Any = "auto") -> str:
    """The accelerator Lightning's ``auto`` picks here (``cuda``, ``mps`` or ``cpu``); others as given."""
    text = str(accelerator)
    if text not in ("auto", "gpu"):
        return text
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu" if text == "auto" else "gpu"


def device_count(accelerator: Any, devices: Any) -> int:
    """How many processes (devices) a Trainer with these arguments uses on this machine."""
    wanted = requested_devices(devices)
    if wanted is not None:
        return wanted
    kind = machine_accelerator(accelerator)
    return max(available_gpus(kind), 1) if kind in ("cuda", "gpu", "mps") else 1


@dataclass(frozen=True)
class MachineFit:
    """What :func:`fit_to_machine` chose.

    Attributes:
        trainer: the Trainer settings to use (``accelerator``, ``devices``, ``strategy``,
            ``precision``), given ones kept.
        data: data-loading settings changed for this machine (``num_workers``, ``pin_memory``).
        devices: processes the run will use; ``global_batch``: images per optimiser step over all
            of them; ``reference_batch``: the row's.
        lr: the learning rate to use; ``row_lr``: the row's.
        row_trainer: whether the row's own Trainer settings apply (asked for by ``--trainer.devices``
            equal to the row's).
    """

    trainer: dict[str, Any]
    data: dict[str, Any]
    devices: int
    global_batch: int
    reference_batch: int
    lr: float
    row_lr: float
    row_trainer: bool

    def describe(self) -> str:
        """One sentence for the start-up banner."""
        settings = ", ".join(f"{key} {value}" for key, value in self.trainer.items())
        where = "the row's own Trainer settings" if self.row_trainer else "this machine"
        accelerator = machine_accelerator(self.trainer.get("accelerator", "auto"))
        scale = (
            f"lr {self.row_lr:g} kept"
            if self.lr == self.row_lr
            else f"lr {self.row_lr:g} x {self.global_batch}/{self.reference_batch} = {self.lr:.4g}"
        )
        return (
            f"on {where}: {settings} ({self.devices} x {accelerator}); global batch "
            f"{self.global_batch} (the row's: {self.reference_batch}), {scale}"
        )


def fit_to_machine(
    row: Mapping[str, Any], config: Mapping[str, Any], given: set[str]
) -> MachineFit:
    """The Trainer, data-loading and learning-rate settings of ``row`` on this machine.

    Args:
        row: the row's configuration as written (``trainer``, ``data.init_args``, ``model.lr``).
        config: the configuration parsed from the row and the command line (same keys).
        given: the dotted keys given on the command line (``"trainer.devices"``, ``"model.lr"``);
            these are never changed.

    Rules: ``--trainer.devices`` equal to the row's asks for the row's Trainer settings (its
    accelerator, strategy and precision). Otherwise each of :data:`AUTO_TRAINER` not given becomes
    ``auto``, but the precision, which stays the row's on a CUDA GPU and becomes ``32-true``
    elsewhere. Loader workers are capped at the CPU count, pinned memory needs CUDA. The learning
    rate, unless given, is scaled by the global batch (per-device batch x devices x nodes x
    accumulated batches) over the row's.
    """
    row_trainer = dict(row.get("trainer") or {})
    trainer = dict(config.get("trainer") or {})
    data = dict((config.get("data") or {}).get("init_args") or {})
    row_data = dict((row.get("data") or {}).get("init_args") or {})

    wants_row = "trainer.devices" in given and str(trainer.get("devices")) == str(
        row_trainer.get("devices")
    )
    chosen = {key: trainer.get(key) for key in AUTO_TRAINER}
    if not wants_row:
        for key in AUTO_TRAINER:
            if f"trainer.{key}" not in given:
                chosen[key] = "auto"
        if "trainer.precision" not in given:
            on_cuda = machine_accelerator(chosen["accelerator"]) == "cuda"
            chosen["precision"] = row_trainer.get("precision", "32-true") if on_cuda else "32-true"
    devices = device_count(chosen["accelerator"], chosen["devices"])

    loading: dict[str, Any] = {}
    cpus = os.cpu_count() or 1
    if "data.num_workers" not in given and int(data.get("num_workers") or 0) > cpus:
        loading["num_workers"] = cpus
    on_cuda = machine_accelerator(chosen["accelerator"]) == "cuda"
    if "data.pin_memory" not in given and data.get("pin_memory") and not on_cuda:
        loading["pin_memory"] = False

    def global_batch(trainer: Mapping[str, Any], data: Mapping[str, Any], devices: int) -> int:
        nodes = int(trainer.get("num_nodes") or 1)
        accumulate = int(trainer.get("accumulate_grad_batches") or 1)
        return int(data.get("batch_size") or 1) * devices * nodes * accumulate

    reference = global_batch(
        row_trainer, row_data, requested_devices(row_trainer.get("devices", 1)) or 1
    )
    batch = global_batch(trainer, data, devices)
    row_lr = float((row.get("model") or {}).get("lr") or (config.get("model") or {}).get("lr"))
    lr = float((config.get("model") or {}).get("lr"))
    if "model.lr" not in given:
        lr = row_lr * batch / reference
    return MachineFit(chosen, loading, devices, batch, reference, lr, row_lr, wants_row)
