"""Before step 1 of ``kr_convert``: are the model's weights trained, or fresh from its constructor?

A converted network starts as the static one either way; what differs is how its attention heads
should start (``KRConfig.dynamic_init`` / ``dynamic_warmup`` left at None are decided here). From
scratch, zero heads and the push make the layers dynamic; a trained ResNet-18 fine-tuned from zero
heads lost 1.0–9.7 points in four seeds of five, where random heads ramped in from the exact static
function stayed within a point of where they started and were more dynamic (docs/learning.md,
"Fine-tuning a converted pretrained network").

The evidence is the BatchNorms: a fresh one has running mean 0, running variance 1 and counted no
batch; any training (or loading trained weights, which carry their statistics) moves them. A
model without BatchNorm (most transformers) cannot tell: it is treated as fresh, and the report
says so.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_are_trained(model: nn.Module) -> bool | None:
    """True if any BatchNorm (1-, 2-, 3-D, synchronised or lazy) of ``model`` has running
    statistics that training wrote (a counted batch, a mean other than 0 or a variance other than
    1); False if it has BatchNorms and all are as constructed; None if it has none to ask (or
    none tracks running statistics)."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    norms = [m for m in norms if not isinstance(m.running_mean, nn.parameter.UninitializedBuffer)]
    if not norms:
        return None
    for norm in norms:
        counted = norm.num_batches_tracked is not None and int(norm.num_batches_tracked) > 0
        if counted:
            return True
        assert norm.running_mean is not None and norm.running_var is not None
        if bool(torch.any(norm.running_mean != 0)) or bool(torch.any(norm.running_var != 1)):
            return True
    return False


def start_note(trained: bool | None, config_init: object, config_warmup: object) -> str | None:
    """The report's line on how the attention heads start, where the weights decided it (both
    options left at None); None where the user set either."""
    if config_init is not None or config_warmup is not None:
        return None
    if trained:
        return (
            "trained weights (BatchNorm running statistics): attention heads start random "
            "(dynamic_init=0.5) and ramp in over 36 training passes (dynamic_warmup=36), from "
            "the static function; pass dynamic_init=0, dynamic_warmup=0 for zero heads"
        )
    if trained is None:
        return (
            "no BatchNorm to tell trained weights from fresh ones: attention heads start at zero; "
            "when fine-tuning pretrained weights pass dynamic_init=0.5, dynamic_warmup=36"
        )
    return None
