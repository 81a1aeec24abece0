"""kr_convert on torchvision's classifiers: forward and backward on the smallest input each accepts."""

import pytest
import torch
import torchvision
from torchvision.models import get_model, list_models

from lightning_kr import kr_convert
from lightning_kr.layers import (
    KRConv2d,
    KRLayer,
    KRLinear,
    KRMultiheadAttention,
    KRShiftedWindowAttention,
)


def smallest_input(name: str) -> int:
    if name.startswith("vit_"):
        return 224  # the ViT builders fix the image size
    if name.startswith("maxvit"):
        return 224  # window partitions need 224
    if name.startswith("inception"):
        return 299  # the auxiliary classifier (training mode) needs a 17x17 Mixed_6e map
    if name.startswith(("swin", "alexnet")):
        return 64
    return 32


REPRESENTATIVE = [
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "convnext_tiny", "regnet_y_400mf",
    "regnet_x_400mf", "densenet121", "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5",
    "googlenet", "inception_v3", "vgg11_bn", "alexnet", "swin_t", "maxvit_t", "vit_b_32",
]  # fmt: skip


def convert_and_train_step(name: str) -> int:
    size = smallest_input(name)
    model = kr_convert(get_model(name), input_size=size)
    replaced = model.report.replaced
    assert replaced, f"{name}: nothing converted"
    assert any(isinstance(m, KRLayer | KRMultiheadAttention) for m in model.modules())
    model.train()
    out = model(torch.randn(2, 3, size, size))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 1000)
    loss = logits.logsumexp(1).mean()
    if isinstance(out, tuple) and len(out) > 1:  # auxiliary logits: trained together
        loss = loss + sum(o.logsumexp(1).mean() for o in out[1:] if o is not None)
    loss.backward()
    grads = [m.weight.grad for m in model.modules() if isinstance(m, KRConv2d | KRLinear)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)
    return len(replaced)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_builders(name):
    assert convert_and_train_step(name) > 0


def test_inception_aux_logits_are_converted_and_trained():
    model = kr_convert(get_model("inception_v3"), input_size=299)
    assert isinstance(model.backbone.AuxLogits.conv0.conv, KRConv2d)
    assert isinstance(model.backbone.AuxLogits.fc, KRLinear)
    model.train()
    out = model(torch.randn(2, 3, 299, 299))
    assert out.aux_logits.shape == (2, 1000)
    (out.logits.sum() + out.aux_logits.sum()).backward()
    assert model.backbone.AuxLogits.fc.weight.grad is not None


def test_swin_window_attention_becomes_kr_attention():
    model = kr_convert(get_model("swin_t"), input_size=64)
    attention = model.backbone.features[1][0].attn
    assert isinstance(attention, KRShiftedWindowAttention)
    assert isinstance(attention.qkv, KRLinear) and isinstance(attention.proj, KRLinear)
    assert isinstance(model.backbone.features[1][0].mlp[0], KRLinear)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(set(list_models(module=torchvision.models)) - set(REPRESENTATIVE))
)
def test_every_other_builder(name):
    assert convert_and_train_step(name) > 0
