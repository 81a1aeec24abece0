"""``KRConfig``: what a user asks ``kr_convert`` for, in one serialisable record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning_kr.layers.dynamic_conv import STRATEGIES
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS

Mode = Literal["kr", "odconv", "dyconv"]
MODES: dict[str, str] = {
    "kr": "Kernel Representation: fusion sees cat[d, h], all four attentions, FFT stem, joint head",
    "odconv": "ablation 'KR off' = ODConv: fusion sees only h, all four attentions, no d",
    "dyconv": "ablation DyConv/CondConv: kernel-number attention only, no d",
}


RUNTIME_OPTIONS = ("strategy", "init_noise")
"""Options that do not change the architecture or what a trained model computes: how per-sample
kernels are applied, and the noise that initialises the candidates. A checkpoint saved with other
values loads; every other option must match."""


@dataclass(frozen=True)
class KRConfig:
    """Options of a KR conversion (see :func:`~lightning_kr.kr_convert` for their meaning)."""

    kernel_num: int = 1
    reduction: float = 1 / 16
    min_hidden: int = 16
    repr_dim: int = 32
    mode: Mode = "kr"
    attentions: tuple[str, ...] | None = None
    fft_size: int = 4
    preserve_function: bool = True
    attention_norm: bool = True
    init_noise: float = 0.1
    strategy: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}; got {self.mode!r}")
        if self.kernel_num < 1:
            raise ValueError(f"kernel_num must be >= 1 (1 = '1x', 4 = '4x'); got {self.kernel_num}")
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be 'auto' or one of {list(STRATEGIES)}; got {self.strategy!r}"
            )
        if self.mode == "kr" and self.repr_dim < 1:
            raise ValueError(f"mode='kr' needs repr_dim >= 1; got {self.repr_dim}")
        if self.attentions is not None:
            unknown = set(self.attentions) - set(ATTENTION_KINDS)
            if unknown:
                raise ValueError(
                    f"unknown attentions {sorted(unknown)}; choose from {list(ATTENTION_KINDS)}"
                )

    @property
    def uses_repr(self) -> bool:
        return self.mode == "kr"

    @property
    def resolved_attentions(self) -> tuple[str, ...]:
        if self.attentions is not None:
            return tuple(a for a in ATTENTION_KINDS if a in self.attentions)
        return ("kernel",) if self.mode == "dyconv" else ATTENTION_KINDS

    def layer_options(self) -> dict[str, Any]:
        """Keyword arguments of every KR layer built for this configuration."""
        neutral = self.preserve_function
        return {
            "kernel_num": self.kernel_num,
            "repr_dim": self.repr_dim if self.uses_repr else 0,
            "reduction": self.reduction,
            "min_hidden": self.min_hidden,
            "attentions": self.resolved_attentions,
            "gate_scale": 2.0 if neutral else 1.0,
            "zero_init": neutral,
            "normalize": self.attention_norm,
        }

    def as_record(self) -> dict[str, Any]:
        """Plain data (str/int/float/bool/list) for checkpoints: safe with ``weights_only=True``."""
        record = {k: v for k, v in asdict(self).items() if k != "extra"}
        record["attentions"] = list(self.resolved_attentions)
        return record
