"""What a model returns: where its class logits are, if it returns any."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def class_logits(output: Any, batch: int | None = None) -> Tensor | None:
    """The class logits (B, K) of a model output, or ``None`` if it has none.

    Logits are a 2-D tensor, or the first item of a tuple / namedtuple (Inception's and GoogLeNet's
    auxiliary logits in training). Dense maps, dictionaries (segmentation, detection losses) and
    lists (detections, optical flows) have none.

    Args:
        output: what the model returned.
        batch: ``B``, if known: logits must have it on their first dimension.
    """
    if isinstance(output, tuple) and output:
        output = output[0]
    if isinstance(output, Tensor) and output.dim() == 2 and batch in (None, output.shape[0]):
        return output
    return None


def main_logits(output: Any) -> Tensor:
    """The logits (B, K) of a classifier's output; raises if there are none."""
    logits = class_logits(output)
    if logits is None:
        raise TypeError(
            f"expected class logits (B, K) (or a tuple whose first item is), got {type(output).__name__}"
        )
    return logits
