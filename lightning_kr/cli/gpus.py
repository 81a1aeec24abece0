"""``check_gpus``: a run that asks for GPUs this machine lacks is refused with the flags to change.

Without it Lightning says ``No supported gpu backend found!`` or lists device ids, and not what to
type instead.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

GPU_ACCELERATORS = ("gpu", "cuda")


def available_gpus(accelerator: str = "gpu") -> int:
    """GPUs this process can use for ``accelerator`` (``"gpu"`` counts an Apple MPS device too)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return 1
    return 0


def requested_devices(devices: Any) -> int | None:
    """How many devices a Trainer's ``devices`` asks for; ``None`` for all of them (``auto``, -1).

    ``3`` and ``"3"``: three; ``[0, 2]`` and ``"0,2"``: two (device ids).
    """
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return None
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    return int(text)


def check_gpus(accelerator: Any, devices: Any, num_nodes: int = 1, hint: str = "") -> None:
    """Refuse a GPU ``accelerator`` when this machine has no GPU or fewer than ``devices``.

    Args:
        accelerator, devices, num_nodes: the Trainer's arguments.
        hint: a sentence appended to the error (e.g. how to scale the learning rate).

    Raises:
        MisconfigurationException: naming ``--trainer.accelerator`` / ``--trainer.devices`` and what
            to pass instead.
    """
    if str(accelerator) not in GPU_ACCELERATORS:
        return
    have = available_gpus(str(accelerator))
    wanted = requested_devices(devices)
    extra = f" {hint}" if hint else ""
    if have == 0:
        raise MisconfigurationException(
            f"--trainer.accelerator {accelerator} asks for GPUs and this machine has none: pass "
            "--trainer.accelerator auto --trainer.devices auto --trainer.strategy auto "
            f"--trainer.precision 32-true to run on what it has.{extra}"
        )
    if wanted is not None and wanted > have and num_nodes == 1:
        raise MisconfigurationException(
            f"--trainer.devices {devices} asks for {wanted} GPUs and this machine has {have}: pass "
            f"--trainer.devices {have} (or auto).{extra}"
        )
