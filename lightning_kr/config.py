"""``KRConfig``: what a user asks ``kr_convert`` for, in one serialisable record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from lightning_kr.layers.dynamic_conv import STRATEGIES
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, NORMS

Mode = Literal["kr", "odconv", "dyconv"]
MODES: dict[str, str] = {
    "kr": "Kernel Representation: fusion sees cat[d, h], all four attentions, FFT stem, joint head",
    "odconv": "ablation 'KR off' = ODConv: fusion sees only h, all four attentions, no d",
    "dyconv": "ablation DyConv/CondConv: kernel-number attention only, no d",
}


RUNTIME_OPTIONS = ("strategy", "init_noise", "include", "exclude")
"""Options a checkpoint may differ in: how per-sample kernels are applied, the noise that
initialises the candidates, and the targets (which layers were converted is checked by name
instead). Every other option must match."""


def named_attention_norm(value: str | bool) -> str:
    """``attention_norm`` as a name; records from before the norms had names say ``True`` (the
    LayerNorm) or ``False`` (none)."""
    if isinstance(value, bool):
        return "layer" if value else "none"
    return value


@dataclass(frozen=True)
class KRConfig:
    """Every option of a KR conversion, its default, and what it means; validated once, here.

    Attributes:
        kernel_num: candidate kernels per layer ``n`` (1 = "1x", 4 = "4x").
        reduction, min_hidden: attention hidden width ``max(C_in · reduction, min_hidden)``.
        repr_dim: size ``D`` of the kernel representation.
        mode: ``"kr"`` (default), ``"odconv"`` (ablation: no ``d``) or ``"dyconv"`` (ablation: no
            ``d``, kernel-number attention only).
        attentions: override the attentions of ``mode``, a subset of
            ``("channel", "filter", "spatial", "kernel")``.
        fft_size: ``f`` of the FFT stem (lowest ``f × f`` frequencies; videos: up to ``f``
            temporal frequencies too).
        preserve_function: start as the static model (default): neutral attentions (gates
            ``2·sigmoid`` of zero-initialised logits, uniform kernel-number attention) and a zero KR
            head, so the converted model computes the original function at initialisation (up to
            float rounding) and trains from scratch at least as fast as it. False: ODConv's
            initialisation (random attention heads, sigmoid gates in (0, 1), random KR head).
        attention_norm: the norm of the attention branch's hidden vector: ``"batch"`` (default:
            ODConv's BatchNorm, across the samples of a batch, with a variance floor ``eps = 1``;
            a batch of one uses the running statistics; logits read out at 1), ``"layer"``
            (per-sample LayerNorm, logits read out at ``1/√hidden``: the earlier default, which
            left trained layers static) or ``"none"``. Records of older checkpoints say ``True``
            (= ``"layer"``) or ``False`` (= ``"none"``). See :class:`~lightning_kr.KernelGenerator`.
        init_noise: relative size of the zero-mean perturbation that makes the candidates differ.
        strategy: how KR convolutions apply per-sample kernels (``"auto"``: by counted cost and
            shape; every strategy is exact).
        include, exclude: which modules to consider: a string is a full regular expression on the
            qualified name, a list matches each entry exactly or as a dotted suffix; exclusion wins.
    """

    kernel_num: int = 1
    reduction: float = 1 / 16
    min_hidden: int = 16
    repr_dim: int = 32
    mode: Mode = "kr"
    attentions: tuple[str, ...] | None = None
    fft_size: int = 4
    preserve_function: bool = True
    attention_norm: str = "batch"
    init_noise: float = 0.1
    strategy: str = "auto"
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("attentions", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "attention_norm", named_attention_norm(self.attention_norm))
        if self.attention_norm not in NORMS:
            raise ValueError(f"attention_norm must be one of {NORMS}; got {self.attention_norm!r}")
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

    @classmethod
    def with_overrides(cls, config: KRConfig | None, **overrides: Any) -> KRConfig:
        """``config`` (default: ``KRConfig()``) with some options replaced; unknown names fail."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown KR option(s) {unknown}; KRConfig has {sorted(names)}")
        values = {f.name: getattr(config, f.name) for f in fields(cls)} if config else {}
        values.update(overrides)
        return cls(**values)

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
            "norm": self.attention_norm,
        }

    def as_record(self) -> dict[str, Any]:
        """Plain data (str/int/float/bool/list) for checkpoints: safe with ``weights_only=True``."""
        record = asdict(self)
        record["attentions"] = list(self.resolved_attentions)
        for name in ("include", "exclude"):
            if isinstance(record[name], tuple):
                record[name] = list(record[name])
        return record
