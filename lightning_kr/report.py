"""``ConversionReport``: what ``kr_convert`` replaced, what it skipped and why, with parameter counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table
from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class LayerDecision:
    """One candidate module: its qualified name, type, what happened to it and why."""

    name: str
    kind: str
    action: str  # "replaced" | "skipped"
    reason: str
    params_before: int
    params_after: int


class RichReport:
    """A report that renders as one rich table (its ``__rich__``): printed, or as text."""

    def print(self, console: Console | None = None) -> None:
        """Print the report as a rich table."""
        (console or Console()).print(self)

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=None)
        with console.capture() as capture:
            console.print(self)
        return capture.get()


@dataclass
class ConversionReport(RichReport):
    """Every Conv/Linear/MultiheadAttention that ``kr_convert`` looked at, and the model totals.

    ``params_after`` counts the converted backbone plus the FFT stem and the joint head.
    """

    decisions: list[LayerDecision] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    first_layer: str | None = None  # the stem / patch embedding left static
    classifier: str | None = None  # the final classifier: the joint head's feature branch
    probe_mode: str = "train"  # "eval" when the training-mode probe pass failed
    probe_fallback_reason: str | None = None  # the error of that failed training-mode pass
    output: str = ""  # type of what the model returned in the probe pass
    notes: list[str] = field(default_factory=list)  # e.g. why there is no joint head

    @property
    def replaced(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.action == "replaced"]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.action == "skipped"]

    def as_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "first_layer": self.first_layer,
            "classifier": self.classifier,
            "probe_mode": self.probe_mode,
            "probe_fallback_reason": self.probe_fallback_reason,
            "output": self.output,
            "notes": list(self.notes),
            "decisions": [asdict(d) for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, record: dict) -> ConversionReport:
        """The report :meth:`as_dict` wrote."""
        record = dict(record)
        decisions = [LayerDecision(**d) for d in record.pop("decisions", [])]
        return cls(decisions=decisions, **record)

    def __rich__(self) -> Table:
        table = Table(
            title=(
                f"kr_convert: {len(self.replaced)} replaced, {len(self.skipped)} skipped; "
                f"params {self.params_before / 1e6:.2f} M → {self.params_after / 1e6:.2f} M"
            )
        )
        captions = list(self.notes)
        if self.probe_fallback_reason is not None:
            captions.append(
                f"probe pass in eval mode (training mode failed: {self.probe_fallback_reason}); "
                "layers that run only in training were not seen"
            )
        if captions:
            table.caption = "\n".join(captions)
        for column in ("layer", "type", "action", "params before", "params after", "reason"):
            table.add_column(column, overflow="fold")
        for d in self.decisions:
            style = "green" if d.action == "replaced" else "yellow"
            table.add_row(
                d.name,
                d.kind,
                f"[{style}]{d.action}[/{style}]",
                f"{d.params_before:,}",
                f"{d.params_after:,}",
                d.reason,
            )
        return table
