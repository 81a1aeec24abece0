"""``KRConfig``: what a user asks ``kr_convert`` for, in one serialisable record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from lightning_kr.layers.kernel_generator import (
    ATTENTION_KINDS,
    DYNAMISM_FLOOR,
    DYNAMISM_PROJECTION,
    DYNAMISM_WARMUP,
    DYNAMISM_WEIGHT,
    FEATURE_FLOOR,
    GATE_RANGE,
    NORMS,
)
from lightning_kr.strategies import registry

Mode = Literal["kr", "odconv", "dyconv"]
MODES: dict[str, str] = {
    "kr": "Kernel Representation: fusion sees cat[d, h], all four attentions, FFT stem, joint head",
    "odconv": "ablation 'KR off' = ODConv: fusion sees only h, all four attentions, no d",
    "dyconv": "ablation DyConv/CondConv: kernel-number attention only, no d",
}


PRETRAINED_DYNAMIC_INIT = 0.5
"""``dynamic_init`` chosen for trained weights (``KRConfig.for_weights``)."""
PRETRAINED_DYNAMIC_WARMUP = 36
"""``dynamic_warmup`` chosen for trained weights (``KRConfig.for_weights``)."""


RUNTIME_OPTIONS = (
    "strategy",
    "init_noise",
    "dynamic_init",
    "dynamism_floor",
    "dynamism_weight",
    "dynamism_projection",
    "include",
    "exclude",
)
"""Options a checkpoint may differ in: how per-sample kernels are applied, the initialisation of
the candidates and of the attention heads (loaded weights replace both), the training-only push
towards dynamic attentions, and the targets (which layers were converted is checked by name
instead). Every other option must match."""


LEGACY_VALUES: dict[str, Any] = {
    "dynamic_init": 0.0,
    "dynamic_warmup": 0,
    "gate_range": 1.0,
    "dynamism_warmup": 0,
    "dynamism_projection": False,
    "feature_floor": 0.0,
}
"""Options added after checkpoints were written whose default is not what those checkpoints
computed: a record without the option is read with this value."""


def is_number(value: Any) -> bool:
    """An int or float, not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


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
            ``1 + r·tanh(z / 2r)`` of zero-initialised logits, uniform kernel-number attention) and a zero KR
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
        dynamic_init: start the attention heads random instead of at zero, so that every image gets
            its own kernel from the first step: head weights ``N(0, s² / hidden)``, which gives each
            attention logit a spread of about ``0.7 s`` across images (its hidden units are
            batch-normalised and rectified). A number sets ``s`` for every attention kind, a
            mapping per kind (e.g. ``{"spatial": 1.5}``; kinds left out start at zero). 0: every
            head starts at zero (with ``dynamic_warmup`` 0 the converted model computes the static
            function exactly and the push makes it dynamic). None (default): by the weights, with
            ``dynamic_warmup`` (both None): :data:`PRETRAINED_DYNAMIC_INIT` (0.5) ramped in over
            :data:`PRETRAINED_DYNAMIC_WARMUP` (36) passes where the model's weights are trained
            (:func:`~lightning_kr.conversion.weights.weights_are_trained`: its normalisation
            layers are not as constructed), 0 and 0 where they are fresh or cannot tell (no norm);
            where only one is set, the other is 0.
            Measured fine-tuning a trained ResNet-18 on the digits, five seeds: KR 1x 97.6 %
            (spread 0.21–0.23) with random heads ramped in, 94.3 % (0.13–0.19; one seed 88.1 %)
            with zero heads, the static network fine-tuned alike 97.9 %; KR 4x 96.8 against
            96.3 (docs/learning.md, "Fine-tuning a converted pretrained network").
        gate_range: neutral gates are ``1 + r·tanh(logit / 2r)`` with ``r = gate_range``: within
            ``1 ± r``, slope 1/2 at the neutral point whatever ``r``. 0.75 (default): a gate
            scales a channel, a filter or a tap for one image between 0.25 and 1.75 times, never
            switches it off; 1 is ``2·sigmoid`` (within 0 and 2, the earlier default, which
            checkpoints written without this option computed)
            (full-range gates pushed towards dynamism ran away to their ends in some seeds,
            accuracy 5–10 points down; 0.5 was too narrow for the synthetic task of
            ``tests/test_dynamism.py``). docs/learning.md, "Dynamism".
        dynamism_floor, dynamism_weight: in training, every attention logit whose standard
            deviation across the batch's samples is below ``dynamism_floor`` is pushed to vary
            more, as if ``dynamism_weight · Σ max(0, floor − std)`` were added to the loss of the
            generator's own weights (a gradient added in backward that does not reach the
            backbone or ``d``: forward values, the exact start, evaluation and export are
            unchanged, and it works in any training loop). Default 0.4 at weight 0.02: from zero
            heads nothing in the task asks for dynamism, and without the floor (0: off) trained
            layers stay near-static (spread ~0.01); with it they are as dynamic as ODConv's
            official code or more (median spread 0.22 / 0.26 for KR 1x / 4x after 144 steps on the
            digits, ODConv's 0.15), KR 1x at the static network's accuracy, 4x 1.0 point below
            (inside its seed spread). See
            :class:`~lightning_kr.layers.kernel_generator.DynamismFloor` and docs/learning.md,
            "Dynamism".
        dynamism_projection: whether the push gives way to the task: per attention logit, where
            the push's gradient over the batch opposes the task's gradient on that logit, it loses
            its component along the task's gradient (PCGrad's projection), so what is left never
            works against the task to first order. ``"auto"`` (default): in layers that mix
            several candidate kernels (``kernel_num > 1``), not in layers with one; ``True`` /
            ``False``: in every layer / in none (``False`` is the push of earlier versions, what
            checkpoints without this option trained with). Measured on resnet18, 144 steps on the
            digits, differences to the static network of the same seed (docs/learning.md,
            "Dynamism"): KR 4x −0.85 points with the projection against −2.7 without over ten
            seeds (four of ten collapsed by 3–8 points without it), the ODConv 4x ablation −0.3
            against −1.5 (five seeds), at the same spread; but KR 1x −1.1 against −0.9 (ten
            seeds) and the ODConv 1x ablation −2.0 against −0.9 (six seeds), hence ``"auto"``.
        dynamism_warmup: ramp the weight of that push in from zero over this many training forward
            passes, ``dynamism_weight · min(1, t / dynamism_warmup)`` (counted per kernel generator
            in the saved buffer ``ramp_step``, as for ``dynamic_warmup``): the first steps follow
            the task alone and the push then grows the variation the task has started. Default
            100 (without it KR's loss fell slower than the static network's in the 60-step check of
            ``tests/test_learning.py``); 0: the full weight from the first pass.
        feature_floor: in layers whose fusion has no ``d`` (``mode="odconv"`` and ``"dyconv"``),
            the kernel generator's input features ``h = GAP(x)`` are amplified to an across-image
            scale of at least this: ``h · max(1, floor / s)``, ``s`` the running root mean square
            over features of their standard deviation across the batch (a saved buffer
            ``feature_scale`` per generator, updated in training like a BatchNorm's running
            statistics), ramped in over the push's warm-up (``dynamism_warmup``). Default 0.25;
            0: off (what checkpoints written without this option computed). Without it, layers whose inputs barely vary between images (a
            transformer's attention and MLP output projections: across-image std 0.005–0.07)
            stayed static (a small Swin, ODConv ablation: spread 0.03–0.06, attention
            projections 0.01–0.04; with it 0.23–0.25), and the DyConv ablation on ResNet-18 was less
            dynamic than ODConv's code (0.125; with it 0.19). With ``d`` (``mode="kr"``) the
            fusion varies with ``d`` whatever the scale of ``h`` (that small Swin: 0.25–0.27), and
            amplifying ``h`` from the first step saturated most gates after five steps at learning rate 0.1
            (``tests/test_learning.py``), so KR layers are left as they are. The start stays exact
            (zero heads). The ODConv 4x ablation on ResNet-18 collapsed in two of ten seeds with
            it (−19.9, −10.6 points) and in none without: compare against that ablation on a CNN
            with ``feature_floor=0``. docs/learning.md, "Dynamism".
        dynamic_warmup: ramp the attention logits in over this many training forward passes,
            ``logit · min(1, t / dynamic_warmup)``: with ``dynamic_init`` the converted model is
            then exactly the static one at step 0 (a pretrained conversion keeps its outputs) and
            fully dynamic after the ramp, in any training loop (each kernel generator counts its
            own passes in a saved buffer ``ramp_step``). 0: no ramp; None (default): by the
            weights, with ``dynamic_init``.
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
    dynamic_init: float | dict[str, float] | None = None
    dynamic_warmup: int | None = None
    gate_range: float = GATE_RANGE
    dynamism_floor: float = DYNAMISM_FLOOR
    dynamism_weight: float = DYNAMISM_WEIGHT
    dynamism_projection: bool | str = DYNAMISM_PROJECTION
    dynamism_warmup: int = DYNAMISM_WARMUP
    feature_floor: float = FEATURE_FLOOR
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
        known = {
            *registry.names(),
            *(old for renamed in registry.RENAMED.values() for old in renamed),
        }
        if self.strategy != "auto" and self.strategy not in known:
            raise ValueError(
                f"strategy must be 'auto' or one of {list(registry.names())}; got {self.strategy!r}"
            )
        if self.mode == "kr" and self.repr_dim < 1:
            raise ValueError(f"mode='kr' needs repr_dim >= 1; got {self.repr_dim}")
        scales = (
            dict(self.dynamic_init)
            if isinstance(self.dynamic_init, Mapping)
            else {kind: self.dynamic_init or 0.0 for kind in ATTENTION_KINDS}
        )
        unknown_kinds = sorted(set(scales) - set(ATTENTION_KINDS))
        if unknown_kinds or not all(is_number(v) and v >= 0 for v in scales.values()):
            raise ValueError(
                f"dynamic_init must be None (by the weights), a number >= 0 or a mapping from "
                f"attention kinds {list(ATTENTION_KINDS)} to numbers >= 0; got "
                f"{self.dynamic_init!r}"
            )
        if isinstance(self.dynamic_init, Mapping):
            object.__setattr__(self, "dynamic_init", {k: float(v) for k, v in scales.items()})
        for name in ("dynamic_warmup", "dynamism_warmup"):
            value = getattr(self, name)
            if value is None and name == "dynamic_warmup":
                continue  # by the weights
            if not is_number(value) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name} must be a whole number of training steps >= 0; got {value!r}"
                )
        if not is_number(self.gate_range) or not 0 < self.gate_range <= 1:
            raise ValueError(
                f"gate_range must be in (0, 1] (gates within 1 ± gate_range); got {self.gate_range!r}"
            )
        for name in ("dynamism_floor", "dynamism_weight", "feature_floor"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (0: off); got {value!r}")
        if not (isinstance(self.dynamism_projection, bool) or self.dynamism_projection == "auto"):
            raise ValueError(
                "dynamism_projection must be True, False or 'auto' (projected where a layer has "
                f"several candidate kernels); got {self.dynamism_projection!r}"
            )
        if self.attentions is not None:
            unknown = set(self.attentions) - set(ATTENTION_KINDS)
            if unknown:
                raise ValueError(
                    f"unknown attentions {sorted(unknown)}; choose from {list(ATTENTION_KINDS)}"
                )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> KRConfig:
        """The config of a record written by :meth:`as_record`, by this or an earlier version:
        options the record lacks take the value that version used (:data:`LEGACY_VALUES`), else
        their default; ``attention_norm`` records of ``True`` / ``False`` are named."""
        values = {**LEGACY_VALUES, **record}
        if "attention_norm" in values:
            values["attention_norm"] = named_attention_norm(values["attention_norm"])
        return cls(**values)

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

    def for_weights(self, trained: bool) -> KRConfig:
        """This config with ``dynamic_init`` / ``dynamic_warmup`` decided where both are None:
        trained weights → random heads ramped in (:data:`PRETRAINED_DYNAMIC_INIT`,
        :data:`PRETRAINED_DYNAMIC_WARMUP`), fresh ones → zero heads, no ramp. Where one is set,
        the other, if None, is 0."""
        by_weights = self.dynamic_init is None and self.dynamic_warmup is None
        init, warmup = (
            (PRETRAINED_DYNAMIC_INIT, PRETRAINED_DYNAMIC_WARMUP)
            if trained and by_weights
            else (0.0, 0)
        )
        return KRConfig.with_overrides(
            self,
            dynamic_init=init if self.dynamic_init is None else self.dynamic_init,
            dynamic_warmup=warmup if self.dynamic_warmup is None else self.dynamic_warmup,
        )

    def dynamic_init_scales(self) -> dict[str, float]:
        """``dynamic_init`` per attention kind (0 where the heads start at zero; None, not decided
        by :meth:`for_weights`, counts as 0)."""
        if isinstance(self.dynamic_init, Mapping):
            return {kind: self.dynamic_init.get(kind, 0.0) for kind in ATTENTION_KINDS}
        return {kind: float(self.dynamic_init or 0.0) for kind in ATTENTION_KINDS}

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
