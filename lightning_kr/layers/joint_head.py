"""``JointHead``: final logits from the global features *and* the last kernel representation."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class JointHead(nn.Module):
    """``logits = classifier(pooled features) + Linear(d_last)``, both trained by one loss.

    The model's own classifier (left static by :func:`~lightning_kr.kr_convert`) is the feature branch;
    this module adds the KR branch, a linear head on the last kernel representation. Models that
    return several outputs in training (Inception's and GoogLeNet's auxiliary logits, as namedtuples
    or tuples) get the KR branch added to their main (first) output only.

    Args:
        repr_dim: ``D``.
        num_classes: number of logits of the model's classifier.
        zero_init: start the KR branch at zero (the converted model then computes the original
            function).

    Shapes: feature logits (B, K) and d (B, D) → (B, K).
    """

    def __init__(self, repr_dim: int, num_classes: int, zero_init: bool = False) -> None:
        super().__init__()
        self.kr_head = nn.Linear(repr_dim, num_classes)
        if zero_init:
            nn.init.zeros_(self.kr_head.weight)
            nn.init.zeros_(self.kr_head.bias)

    def forward(self, feature_logits: Any, d: Tensor) -> Any:
        if isinstance(feature_logits, Tensor):
            return feature_logits + self.kr_head(d).to(feature_logits.dtype)
        if isinstance(feature_logits, tuple) and feature_logits:
            main = self.forward(feature_logits[0], d)
            rest = tuple(feature_logits[1:])
            if hasattr(feature_logits, "_fields"):  # namedtuple
                return type(feature_logits)(main, *rest)
            return (main, *rest)
        raise TypeError(
            f"JointHead cannot combine a model output of type {type(feature_logits).__name__}; "
            "the model must return logits (B, K) or a tuple whose first item is the logits"
        )
