"""Step 3 of ``kr_convert``: build the KR layer that replaces a static module — one table row per type.

A new layer type is one entry of :data:`FACTORIES`: the static type, and a function from the static
module and the :class:`~lightning_kr.KRConfig` to its KR replacement (which starts from the static
weights). Composite modules (attention) replace their projections together with themselves: their
children are listed in :data:`COMPOSITE_CHILDREN` and never considered on their own.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

from lightning_kr.config import KRConfig
from lightning_kr.layers.dynamic_conv3d import STRATEGIES_3D
from lightning_kr.layers.kernel_generator import KernelGenerator
from lightning_kr.layers.kr_conv1d import KRConv1d
from lightning_kr.layers.kr_conv2d import KRConv2d
from lightning_kr.layers.kr_conv3d import KRConv3d
from lightning_kr.layers.kr_linear import KRLinear
from lightning_kr.layers.kr_multihead_attention import KRMultiheadAttention
from lightning_kr.layers.kr_window_attention import KRShiftedWindowAttention

Factory = Callable[[nn.Module, KRConfig], nn.Module]


def _conv1d(conv: nn.Module, config: KRConfig) -> nn.Module:
    return KRConv1d.from_conv(
        conv, init_noise=config.init_noise, strategy=config.strategy, **config.layer_options()
    )


def _conv2d(conv: nn.Module, config: KRConfig) -> nn.Module:
    return KRConv2d.from_conv(
        conv, init_noise=config.init_noise, strategy=config.strategy, **config.layer_options()
    )


def _conv3d(conv: nn.Module, config: KRConfig) -> nn.Module:
    # The 3-D strategies are a subset of the 2-D ones; a 2-D-only choice means "auto" here.
    strategy = config.strategy if config.strategy in STRATEGIES_3D else "auto"
    return KRConv3d.from_conv(
        conv, init_noise=config.init_noise, strategy=strategy, **config.layer_options()
    )


def _linear(linear: nn.Module, config: KRConfig) -> nn.Module:
    return KRLinear.from_linear(linear, init_noise=config.init_noise, **config.layer_options())


def _multihead_attention(mha: nn.Module, config: KRConfig) -> nn.Module:
    return KRMultiheadAttention.from_mha(
        mha, init_noise=config.init_noise, **config.layer_options()
    )


def _window_attention(attention: nn.Module, config: KRConfig) -> nn.Module:
    return KRShiftedWindowAttention.from_swin(
        attention, init_noise=config.init_noise, **config.layer_options()
    )


FACTORIES: dict[type[nn.Module], Factory] = {
    nn.Conv1d: _conv1d,
    nn.Conv2d: _conv2d,
    nn.Conv3d: _conv3d,
    nn.Linear: _linear,
    nn.MultiheadAttention: _multihead_attention,
    ShiftedWindowAttention: _window_attention,  # Swin (v1); ShiftedWindowAttentionV2 is a subclass
    ShiftedWindowAttentionV2: _window_attention,
    ShiftedWindowAttention3d: _window_attention,  # video Swin
}
"""Static module type → KR factory. Subclasses use their base's row when they compute what the base
computes (no overridden ``forward``)."""

COMPOSITE_CHILDREN: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    ShiftedWindowAttention: ("qkv", "proj"),
    ShiftedWindowAttentionV2: ("qkv", "proj", "cpb_mlp"),
    ShiftedWindowAttention3d: ("qkv", "proj"),
}
"""Children a composite's factory replaces together with it (its weights may be read directly)."""

ENTRY_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Types that can be a model's first layer (stem / patch embedding), which stays static."""

STATIC_TYPES: dict[type[nn.Module], str] = {
    nn.ConvTranspose1d: "transposed convolutions stay static (no KR version)",
    nn.ConvTranspose2d: "transposed convolutions stay static (no KR version)",
    nn.ConvTranspose3d: "transposed convolutions stay static (no KR version)",
}
"""Layer types that are listed in the report as static, with why."""

_FORWARD_METHODS = ("forward", "_conv_forward")


def base_type(module: nn.Module) -> type[nn.Module] | None:
    """The :data:`FACTORIES` row for ``module``'s type (itself or its nearest listed base)."""
    return next((t for t in type(module).__mro__ if t in FACTORIES), None)


def computes_like_base(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` computes exactly what ``base`` computes (a subclass without its own forward)."""
    return all(
        getattr(type(module), method, None) is getattr(base, method, None)
        for method in _FORWARD_METHODS
    )


def create(module: nn.Module, config: KRConfig) -> nn.Module:
    """The KR replacement of ``module`` (whose type has a :data:`FACTORIES` row)."""
    base = base_type(module)
    if base is None:
        raise TypeError(f"no KR layer replaces {type(module).__name__}")
    layer = FACTORIES[base](module, config)
    scales = config.dynamic_init_scales()
    for generator in layer.modules():
        if isinstance(generator, KernelGenerator):
            generator.gate_range = config.gate_range
            generator.dynamism_floor = config.dynamism_floor
            generator.dynamism_weight = config.dynamism_weight
            generator.randomise_heads(scales)  # a no-op for scales of 0
            if config.dynamic_warmup:
                generator.ramp_in(config.dynamic_warmup)
            if config.dynamism_warmup:
                generator.warm_up_dynamism(config.dynamism_warmup)
    return layer
