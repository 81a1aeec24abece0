"""``ConversionPlan``: what probe and decide concluded about a model, as plain data.

``kr_convert`` probes a model once and decides which layers to replace; the plan keeps every
conclusion that building the KR model needs (which layers, where the ``d_0`` stem reads, how rows
are laid out, whether there is a joint head). Applying a saved plan to the same architecture
(:meth:`~lightning_kr.KRModel.from_pretrained`) builds the same KR model without a probe pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConversionPlan:
    """The decisions of one conversion.

    Attributes:
        replace: qualified names of the modules replaced by KR layers, in module order.
        layouts: the batch layout (``"stacked"`` / ``"interleaved"``) of the converted layers whose
            rows are ``k`` per sample; every other layer sees the batch itself.
        num_classes: ``K`` when the model returns class logits (a joint head is added), else None.
        stem_on: the module whose input the ``d_0`` stem reads (``""``: the model's input).
        stem_input_shape: one sample's shape there, ``(C, H, W)`` or ``(C, T, H, W)``.
        stem_rows, stem_layout: that input holds ``stem_rows`` rows per sample in this layout.
        unread_repr_from: without a joint head, the module that runs last and once: its last KR
            layer writes no ``d_(i+1)`` (nothing would read it); ``None`` otherwise.
    """

    replace: tuple[str, ...]
    layouts: dict[str, str] = field(default_factory=dict)
    num_classes: int | None = None
    stem_on: str = ""
    stem_input_shape: tuple[int, ...] = (3, 224, 224)
    stem_rows: int = 1
    stem_layout: str = "batch"
    unread_repr_from: str | None = None

    def as_record(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {
            "replace": list(self.replace),
            "layouts": dict(self.layouts),
            "num_classes": self.num_classes,
            "stem_on": self.stem_on,
            "stem_input_shape": list(self.stem_input_shape),
            "stem_rows": self.stem_rows,
            "stem_layout": self.stem_layout,
            "unread_repr_from": self.unread_repr_from,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ConversionPlan:
        """The plan :meth:`as_record` wrote."""
        return cls(
            replace=tuple(record["replace"]),
            layouts=dict(record.get("layouts", {})),
            num_classes=record.get("num_classes"),
            stem_on=record.get("stem_on", ""),
            stem_input_shape=tuple(record.get("stem_input_shape", (3, 224, 224))),
            stem_rows=int(record.get("stem_rows", 1)),
            stem_layout=record.get("stem_layout", "batch"),
            unread_repr_from=record.get("unread_repr_from"),
        )
