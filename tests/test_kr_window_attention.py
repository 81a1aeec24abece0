import copy

import pytest
import torch
from torch import nn
from torchvision.models import swin_t, swin_v2_t
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.models.video import swin3d_t
from torchvision.models.video.swin_transformer import SwinTransformer3d

from lightning_kr.config import KRConfig
from lightning_kr.layers.kr_linear import KRLinear
from lightning_kr.layers.kr_window_attention import SWIN_ATTENTIONS, KRShiftedWindowAttention
from lightning_kr.layers.repr_chain import ReprChain

DIM, HEADS, BATCH = 32, 2, 2
WINDOWS = {"v1": [4, 4], "v2": [4, 4], "3d": [2, 4, 4]}
# Odd sizes that need padding, a size that is a multiple along one dimension, a map smaller than
# the window (no shift there; the 3-D window shrinks to it).
SIZES = {
    "v1": [(7, 5), (8, 6), (3, 3)],
    "v2": [(7, 5), (8, 6), (3, 3)],
    "3d": [(3, 7, 5), (2, 8, 6), (1, 3, 3)],
}
CASES = [
    (variant, shifted, size)
    for variant in SWIN_ATTENTIONS
    for shifted in (False, True)
    for size in SIZES[variant]
]


def swin_attention(variant: str, shifted: bool) -> nn.Module:
    """A torchvision Swin attention in eval mode with a non-zero key bias (v2 zeroes it itself)
    and, for v2, one head's logit scale above the clamp at log(100)."""
    window = WINDOWS[variant]
    shift = [w // 2 if shifted else 0 for w in window]
    module = SWIN_ATTENTIONS[variant](DIM, window, shift, HEADS).eval()
    with torch.no_grad():
        nn.init.normal_(module.qkv.bias)
        for name, parameter in module.named_parameters():
            if name.startswith("relative_position_bias_table"):
                nn.init.normal_(parameter)
        if variant == "v2":
            module.logit_scale[0] = 6.0
    return module


def attached(layer: KRShiftedWindowAttention, chain: ReprChain | None = None) -> ReprChain:
    chain = chain or ReprChain()
    for name, link in layer.named_modules():
        if isinstance(link, KRLinear):  # qkv, (v2: cpb_mlp.0, cpb_mlp.2,) proj
            link.attach(chain, f"attn.{name}")
    return chain


def run(layer: KRShiftedWindowAttention, x: torch.Tensor, d0: torch.Tensor) -> torch.Tensor:
    chain = attached(layer)
    with chain.run(d0):
        return layer(x)


def perturb_generators(layer: nn.Module) -> None:
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "generator" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))


def per_sample_weights(link: KRLinear, h: torch.Tensor, d: torch.Tensor):
    """Each sample's explicit kernel ``a_f ⊙ (√n Σ_n a_kn V_n) ⊙ a_c`` (B, out, in) and ``d_next``."""
    att = link.generator(h, d)
    candidates = link.weight.reshape(link.kernel_num, -1)
    if att.kernel is None:
        kernels = candidates[0].expand(h.shape[0], -1)
    else:
        kernels = (att.kernel * link.mix_scale) @ candidates
    kernels = kernels.view(-1, link.out_features, link.in_features)
    if att.filter is not None:
        kernels = kernels * att.filter[:, :, None]
    if att.channel is not None:
        kernels = kernels * att.channel[:, None, :]
    return kernels, att.repr_out


def torchvision_per_image(static, x, qkv_weights, proj_weights, proj_bias, cpb_weights=None):
    """torchvision's attention run image by image, each with its own qkv / proj kernels (and, for
    v2, its own position-bias MLP kernels)."""
    out = []
    for b in range(x.shape[0]):
        module = copy.deepcopy(static)
        with torch.no_grad():
            if cpb_weights is not None:
                module.cpb_mlp[0].weight.copy_(cpb_weights[0][b])
                module.cpb_mlp[2].weight.copy_(cpb_weights[1][b])
            module.qkv.weight.copy_(qkv_weights[b])
            module.proj.weight.copy_(proj_weights[b])
            module.proj.bias.copy_(proj_bias)
        out.append(module(x[b : b + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize(("variant", "shifted", "size"), CASES)
def test_neutral_conversion_equals_torchvision(variant, shifted, size, kernel_num):
    swin = swin_attention(variant, shifted)
    layer = KRShiftedWindowAttention.from_swin(
        swin, **KRConfig(kernel_num=kernel_num).layer_options()
    )
    assert layer.variant == variant and not layer.training
    x, d0 = torch.randn(BATCH, *size, DIM), torch.randn(BATCH, 32)
    torch.testing.assert_close(run(layer, x, d0), swin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "shifted", "size"), CASES)
def test_per_image_kernels_equal_torchvision_run_per_image(variant, shifted, size):
    swin = swin_attention(variant, shifted)
    layer = KRShiftedWindowAttention.from_swin(swin, **KRConfig(kernel_num=4).layer_options())
    perturb_generators(layer)
    x, d0 = torch.randn(BATCH, *size, DIM), torch.randn(BATCH, 32)
    chain = attached(layer)
    with chain.run(d0):
        got = layer(x)
        d_end = chain.read("end", BATCH)

    token_dims = tuple(range(1, x.dim() - 1))
    static = layer.to_static()
    with torch.no_grad():
        qkv_weights, d1 = per_sample_weights(layer.qkv, x.mean(token_dims), d0)
        cpb = None
        if variant == "v2":  # the position-bias MLP's kernels, from d after qkv, per image
            coords = layer.relative_coords_table.flatten(1, 2).expand(BATCH, -1, -1)
            first, d1 = per_sample_weights(layer.cpb_mlp[0], coords.mean(1), d1)
            hidden = torch.relu(coords @ first.transpose(1, 2) + layer.cpb_mlp[0].bias)
            second, d1 = per_sample_weights(layer.cpb_mlp[2], hidden.mean(1), d1)
            cpb = (first, second)
        # The attention output (proj's input) per image: torchvision with an identity proj.
        eye = torch.eye(DIM).expand(BATCH, DIM, DIM)
        attended = torchvision_per_image(static, x, qkv_weights, eye, torch.zeros(DIM), cpb)
        proj_weights, d2 = per_sample_weights(layer.proj, attended.mean(token_dims), d1)
        want = torchvision_per_image(static, x, qkv_weights, proj_weights, layer.proj.bias, cpb)
    assert not torch.allclose(qkv_weights[0], qkv_weights[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_end, d2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(SWIN_ATTENTIONS))
def test_gradients_reach_input_repr_and_candidates(variant):
    layer = KRShiftedWindowAttention.from_swin(
        swin_attention(variant, shifted=True), **KRConfig(kernel_num=4).layer_options()
    )
    perturb_generators(layer)
    x = torch.randn(BATCH, *SIZES[variant][0], DIM, requires_grad=True)
    d0 = torch.randn(BATCH, 32, requires_grad=True)
    y = run(layer, x, d0)
    (y * torch.randn_like(y)).sum().backward()
    for name, grad in [
        ("x", x.grad),
        ("d0", d0.grad),
        ("qkv.weight", layer.qkv.weight.grad),
        ("proj.weight", layer.proj.weight.grad),
    ]:
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", list(SWIN_ATTENTIONS))
def test_to_static_returns_the_torchvision_module(variant):
    swin = swin_attention(variant, shifted=True)
    layer = KRShiftedWindowAttention.from_swin(swin, **KRConfig(kernel_num=4).layer_options())
    assert set(swin.state_dict()) <= set(layer.state_dict())
    static = layer.to_static()
    assert type(static) is type(swin)
    assert static.window_size == swin.window_size and static.shift_size == swin.shift_size
    want = swin.state_dict()
    for key, value in static.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)
    x = torch.randn(BATCH, *SIZES[variant][0], DIM)
    torch.testing.assert_close(static(x), run(layer, x, torch.randn(BATCH, 32)))


class RecordingChain(ReprChain):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, object]] = []

    def read(self, layer_name: str, batch_size: int, *args, **kwargs) -> torch.Tensor:
        self.events.append(("read", layer_name))
        return super().read(layer_name, batch_size, *args, **kwargs)

    def write(self, d: torch.Tensor, *args, **kwargs) -> None:
        self.events.append(("write", tuple(d.shape)))
        super().write(d, *args, **kwargs)


@pytest.mark.parametrize("variant", list(SWIN_ATTENTIONS))
def test_qkv_then_proj_write_image_batch_repr(variant):
    layer = KRShiftedWindowAttention.from_swin(
        swin_attention(variant, shifted=True), **KRConfig().layer_options()
    )
    chain = attached(layer, RecordingChain())
    x, d0 = torch.randn(BATCH, *SIZES[variant][0], DIM), torch.randn(BATCH, 32)
    with chain.run(d0):
        layer(x)
    links = ["qkv", "cpb_mlp.0", "cpb_mlp.2", "proj"] if variant == "v2" else ["qkv", "proj"]
    assert chain.events == [
        event for link in links for event in (("read", f"attn.{link}"), ("write", (BATCH, 32)))
    ]


def test_refuses_other_modules_and_layouts():
    with pytest.raises(TypeError, match="ShiftedWindowAttention"):
        KRShiftedWindowAttention.from_swin(nn.MultiheadAttention(DIM, HEADS))
    layer = KRShiftedWindowAttention.from_swin(swin_attention("v1", True), repr_dim=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        layer(torch.randn(BATCH, 7, DIM))


def kr_swin(model: nn.Module, **layer_options) -> tuple[nn.Module, ReprChain]:
    """``model`` with every torchvision Swin attention replaced by the KR one, on one chain."""
    model, chain = copy.deepcopy(model), ReprChain()
    for name, module in list(model.named_modules()):
        if type(module) in SWIN_ATTENTIONS.values():
            layer = KRShiftedWindowAttention.from_swin(module, **layer_options)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
            for link_name, link in layer.named_modules():
                if isinstance(link, KRLinear):
                    link.attach(chain, f"{name}.{link_name}")
    return model, chain


SMALL = dict(embed_dim=32, depths=[2, 2], num_heads=[2, 4], num_classes=10)
MODELS = {
    "swin": (lambda: SwinTransformer([4, 4], window_size=[4, 4], **SMALL), (BATCH, 3, 44, 36)),
    "swin_v2": (
        lambda: SwinTransformer(
            [4, 4],
            window_size=[4, 4],
            block=SwinTransformerBlockV2,
            downsample_layer=PatchMergingV2,
            **SMALL,
        ),
        (BATCH, 3, 44, 36),
    ),
    "swin3d": (
        lambda: SwinTransformer3d([2, 4, 4], window_size=[2, 4, 4], **SMALL),
        (BATCH, 3, 6, 36, 28),
    ),
    # torchvision's own builders at a tiny input (about a second each).
    "swin_t": (swin_t, (BATCH, 3, 64, 64)),
    "swin_v2_t": (swin_v2_t, (BATCH, 3, 64, 64)),
    "swin3d_t": (swin3d_t, (BATCH, 3, 4, 64, 64)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_swin_model_with_kr_attention_keeps_its_logits(name):
    build, shape = MODELS[name]
    model = build().eval()
    kr, chain = kr_swin(model, **KRConfig().layer_options())
    swin_attentions = [m for m in model.modules() if type(m) in SWIN_ATTENTIONS.values()]
    converted = [m for m in kr.modules() if isinstance(m, KRShiftedWindowAttention)]
    assert len(converted) == len(swin_attentions) > 0
    assert not any(type(m) in SWIN_ATTENTIONS.values() for m in kr.modules())
    x = torch.randn(shape)
    with chain.run(torch.randn(BATCH, 32)):
        got = kr(x)
        d_end = chain.read("end", BATCH)
    assert d_end.shape == (BATCH, 32)
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
