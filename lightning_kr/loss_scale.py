"""``set_loss_scale``: tell the KR layers by how much the loss is scaled before backward.

The dynamism push (:class:`~lightning_kr.layers.kernel_generator.DynamismFloor`) adds its gradient
beside the task's inside backward, at a fixed weight. Two things scale the task's gradient but not
that push, unless the layers are told:

* mixed precision with a ``GradScaler`` (Lightning's ``precision="16-mixed"``, the recipes'
  default on a CUDA GPU) multiplies the loss by its scale (65,536 at the start) and divides every
  gradient by it before the step: a push left unscaled would arrive 65,536 times too weak, and
  the trained layers would stay static;
* gradient accumulation over ``A`` batches divides each batch's loss by ``A``: an unscaled push
  would be ``A`` times too strong.

:class:`~lightning_kr.KRClassifier` sets the scale before every backward. Anyone else's loop or
``LightningModule`` calls this function once per backward, after the loss is known::

    scaler = torch.amp.GradScaler("cuda")
    set_loss_scale(model, scaler.get_scale() / accumulate)   # or set_loss_scale(model, scaler)
    scaler.scale(loss / accumulate).backward()
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kr.layers.kernel_generator import KernelGenerator


def set_loss_scale(model: nn.Module, scale: float | Tensor | torch.amp.GradScaler) -> int:
    """Set the factor the loss is multiplied by before backward on every kernel generator of
    ``model``; a ``GradScaler`` gives its current scale (1 when it is disabled).

    Returns:
        The number of kernel generators set.

    Raises:
        ValueError: a scale that is not a positive finite number.
    """
    if isinstance(scale, torch.amp.GradScaler):
        scale = scale.get_scale() if scale.is_enabled() else 1.0
    value = float(scale)
    if not (value > 0 and value != float("inf")):
        raise ValueError(
            f"the loss scale must be a positive finite number (a GradScaler's get_scale() divided "
            f"by the gradient-accumulation steps); got {value}"
        )
    generators = [m for m in model.modules() if isinstance(m, KernelGenerator)]
    for generator in generators:
        generator.loss_scale = value
    return len(generators)
