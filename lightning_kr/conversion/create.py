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
from lightning_kr.layers.kernel_generator import KernelGenerator, projects_push
from lightning_kr.layers.kr_conv import KRConvNd
from lightning_kr.layers.kr_conv1d import KRConv1d
from lightning_kr.layers.kr_conv2d import KRConv2d
from lightning_kr.layers.kr_conv3d import KRConv3d
from lightning_kr.layers.kr_linear import KRLinear
from lightning_kr.layers.kr_multihead_attention import KRMultiheadAttention
from lightning_kr.layers.kr_window_attention import KRShiftedWindowAttention
from lightning_kr.strategies import registry
from lightning_kr.strategies.geometry import ConvGeometry

Factory = Callable[[nn.Module, KRConfig], nn.Module]


def layer_strategy(strategy: str, dims: int) -> str:
    """The strategy a layer with rank-``dims`` kernels takes for the configured one: ``strategy``
    (an old name replaced by its new one) where the registry has it for that rank, else ``"auto"``
    (a 2-D-only strategy on a 3-D layer)."""
    strategy = registry.resolve_name(strategy, dims)
    return strategy if strategy in registry.names(dims) else "auto"


def _conv1d(conv: nn.Module, config: KRConfig) -> nn.Module:
    return KRConv1d.from_conv(  # the 2-D strategies on a height-1 map
        conv, init_noise=config.init_noise, strategy=layer_strategy(config.strategy, 2),
        **config.layer_options(),
    )  # fmt: skip


def _conv2d(conv: nn.Module, config: KRConfig) -> nn.Module:
    return KRConv2d.from_conv(
        conv, init_noise=config.init_noise, strategy=layer_strategy(config.strategy, 2),
        **config.layer_options(),
    )  # fmt: skip


def _conv3d(conv: nn.Module, config: KRConfig) -> nn.Module:
    return KRConv3d.from_conv(
        conv, init_noise=config.init_noise, strategy=layer_strategy(config.strategy, 3),
        **config.layer_options(),
    )  # fmt: skip


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


def layer_geometry(layer: KRConvNd) -> ConvGeometry:
    """The geometry of a KR convolution before any call (no batch, no sizes): what decides whether a
    strategy applies. A 1-D layer runs as a height-1 2-D convolution."""
    shape, stride, dilation = tuple(layer.weight.shape), layer.stride, layer.dilation
    if len(stride) == 1:
        shape, stride, dilation = (*shape[:3], 1, shape[3]), (1, *stride), (1, *dilation)
    return ConvGeometry(shape, stride, dilation, layer.groups, frozenset(layer.generator.heads))


def check_strategy(layer: nn.Module, name: str, module: nn.Module) -> None:
    """Raise ValueError, naming the layer, where its forced strategy cannot run it (rather than at
    its first forward pass)."""
    if not isinstance(layer, KRConvNd) or layer.strategy == "auto":
        return
    geometry = layer_geometry(layer)
    need = registry.get(layer.strategy, geometry.dims).applies(geometry)
    if need is not None:
        raise ValueError(
            f"strategy {layer.strategy!r} cannot run layer '{name}' ({type(module).__name__}, "
            f"stride {layer.stride}, groups {layer.groups}, {layer.kernel_num} candidate(s), "
            f"attentions {sorted(geometry.attentions)}): it needs {need}. Use strategy='auto', or "
            "leave this layer out with exclude="
        )


def create(module: nn.Module, config: KRConfig, name: str = "?") -> nn.Module:
    """The KR replacement of ``module`` (whose type has a :data:`FACTORIES` row), called ``name``
    in the model; ValueError where the configured strategy cannot run it."""
    base = base_type(module)
    if base is None:
        raise TypeError(f"no KR layer replaces {type(module).__name__}")
    layer = FACTORIES[base](module, config)
    check_strategy(layer, name, module)
    scales = config.dynamic_init_scales()
    for generator in layer.modules():
        if isinstance(generator, KernelGenerator):
            generator.gate_range = config.gate_range
            generator.dynamism_floor = config.dynamism_floor
            generator.dynamism_weight = config.dynamism_weight
            generator.dynamism_projection = projects_push(
                config.dynamism_projection, generator.kernel_num
            )
            generator.randomise_heads(scales)  # a no-op for scales of 0
            if config.dynamic_warmup:
                generator.ramp_in(config.dynamic_warmup)
            if config.dynamism_warmup:
                generator.warm_up_dynamism(config.dynamism_warmup)
            if config.feature_floor and not generator.uses_repr:
                generator.amplify_features(config.feature_floor)
    return layer
