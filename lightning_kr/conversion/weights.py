"""Before step 3 of ``kr_convert`` (create): are the model's weights trained, or fresh from its
constructor?

A converted network starts as the static one either way; what differs is how its attention heads
should start (``KRConfig.dynamic_init`` / ``dynamic_warmup`` left at None are decided here). From
scratch, zero heads and the push make the layers dynamic; a trained ResNet-18 fine-tuned from zero
heads lost 1.0–9.7 points in four seeds of five, where random heads ramped in from the exact static
function stayed within a point of where they started and were more dynamic (docs/learning.md,
"Fine-tuning a converted pretrained network").

The evidence is the normalisation layers, whose constructed state is fixed: a fresh BatchNorm has
running mean 0, running variance 1 and counted no batch; a fresh LayerNorm, GroupNorm or RMSNorm
has a weight and a bias that are each one constant (1 and 0, or 0 for the post-norms that some
models zero-initialise, as timm's SwinV2). Training moves them, element by element, and trained
weights loaded from a file carry them.
A model without any (a plain stack of convolutions) cannot tell: it is treated as fresh, and the
report says so.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_kr.config import PRETRAINED_DYNAMIC_INIT, PRETRAINED_DYNAMIC_WARMUP

AFFINE_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Norms whose affine weight and bias are each constructed as one constant (1 and 0, or 0)."""


def weights_are_trained(model: nn.Module) -> bool | None:
    """True if a normalisation layer of ``model`` is not as constructed: a BatchNorm (1-, 2-,
    3-D, synchronised) whose running statistics training wrote (a counted batch, a mean other
    than 0 or a variance other than 1), or a LayerNorm / GroupNorm / RMSNorm whose weight or bias
    is not one constant; False if it has such layers and all are as constructed; None if it has
    none to ask."""
    asked = False
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            mean, var, count = module.running_mean, module.running_var, module.num_batches_tracked
            if mean is None or var is None or isinstance(mean, nn.parameter.UninitializedBuffer):
                continue
            asked = True
            if count is not None and int(count) > 0:
                return True
            if bool(torch.any(mean != 0)) or bool(torch.any(var != 1)):
                return True
        elif isinstance(module, AFFINE_NORMS):
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if weight is None or isinstance(weight, nn.parameter.UninitializedParameter):
                continue
            asked = True
            if _varies(weight) or (bias is not None and _varies(bias)):
                return True
    return False if asked else None


def _varies(tensor: torch.Tensor) -> bool:
    """Whether the elements of ``tensor`` are not all equal."""
    flat = tensor.detach().reshape(-1)
    return bool(torch.any(flat != flat[0])) if flat.numel() else False


def start_note(trained: bool | None, config_init: object, config_warmup: object) -> str | None:
    """The report's line on how the attention heads start, where the weights decided it (both
    options left at None); None where the user set either."""
    if config_init is not None or config_warmup is not None:
        return None
    random = f"dynamic_init={PRETRAINED_DYNAMIC_INIT}, dynamic_warmup={PRETRAINED_DYNAMIC_WARMUP}"
    if trained:
        return (
            "trained weights (normalisation layers not as constructed): attention heads start "
            f"random and ramp in from the static function ({random}); pass dynamic_init=0, "
            "dynamic_warmup=0 for zero heads"
        )
    if trained is None:
        return (
            "no normalisation layer to tell trained weights from fresh ones: attention heads start "
            f"at zero; when fine-tuning pretrained weights pass {random}"
        )
    return None
