"""``lightning_kr.utilities.mac_count``: MACs of a model and of its static counterpart."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torchvision.models import VisionTransformer, resnet18

from lightning_kr import kr_convert
from lightning_kr.layers.dynamic_conv import STRATEGIES
from lightning_kr.utilities.mac_count import (
    MacCount,
    count_macs,
    count_overhead,
    static_counterpart,
)

# The operators torch.utils.flop_counter.FlopCounterMode counts on CPU (2 flops per multiply-add).
# CPU attention (scaled_dot_product_attention's flash kernel for CPU) is counted by the torch
# versions that register a formula for it (2.15 does, 2.14 does not); compare it only there.
CPU_ATTENTION_COUNTED = any(
    str(op) == "aten._scaled_dot_product_flash_attention_for_cpu" for op in flop_registry
)
SHARED_OPS = {"conv", "linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "einsum", "dot"} | (
    {"scaled_dot_product_attention"} if CPU_ATTENTION_COUNTED else set()
)


def tiny_cnn(num_classes: int = 4) -> nn.Sequential:
    """Layers of every shape the KR strategies tell apart: large and small maps, stride 2,
    depthwise, 1×1, and a hidden linear layer (first conv and classifier stay static)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )


def tiny_vit() -> nn.Module:
    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=4,
    )  # fmt: skip


def shared_macs(model: nn.Module, x: torch.Tensor) -> tuple[MacCount, int, float]:
    """(our count, our MACs on the shared operators, FlopCounterMode's flops / 2)."""
    counted = count_macs(model, x)
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        model.eval()(x)
    assert counted.unsupported == {}, "every operator of the KR model has a handle"
    ours = sum(v for op, v in counted.by_operator.items() if op in SHARED_OPS)
    return counted, ours, reference.get_total_flops() / 2


@pytest.mark.parametrize(
    ("strategy", "kernel_num"),
    [
        ("auto", 1),
        ("auto", 4),
        *((s, 4) for s in ("grouped", "unfold", "reference") if s in STRATEGIES),
    ],
)
def test_contractions_agree_with_torch_flop_counter(strategy, kernel_num):
    """Convolutions and matrix products: fvcore with our handles == FlopCounterMode / 2.

    A batch of 2 exercises broadcast ``matmul`` (im2col columns against a shared kernel), which
    fvcore's default handle undercounts, and ``groups = B`` convolutions.
    """
    model = kr_convert(tiny_cnn(), kernel_num=kernel_num, input_size=20, strategy=strategy)
    _, ours, reference = shared_macs(model, torch.randn(2, 3, 20, 20))
    assert ours == pytest.approx(reference, rel=1e-6)


def test_contractions_agree_on_attention_models():
    model = kr_convert(tiny_vit(), kernel_num=2, input_size=16, fft_size=2)
    _, ours, reference = shared_macs(model, torch.randn(2, 3, 16, 16))
    assert ours == pytest.approx(reference, rel=1e-6)


@pytest.fixture(scope="module")
def kr_resnet():
    torch.manual_seed(0)
    return kr_convert(resnet18(num_classes=10), kernel_num=4, input_size=32)


class BroadcastMatmul(nn.Module):
    def forward(self, cols):  # one kernel (g, C_out/g, K) against every sample's columns
        return torch.matmul(torch.ones(2, 3, 5), cols)


def test_broadcast_matmul_counts_every_sample():
    """fvcore's own matmul handle counts prod(first operand) · L and misses the batch here."""
    counted = count_macs(BroadcastMatmul(), torch.randn(4, 2, 5, 7))
    assert counted.by_operator["matmul"] == 4 * 2 * 3 * 5 * 7


def test_static_resnet18_is_fvcores_figure():
    counted = count_macs(resnet18(), torch.randn(1, 3, 224, 224))
    assert counted.gmacs == pytest.approx(1.82, abs=0.005)
    assert counted.by_operator["conv"] == 1_813_561_344
    assert counted.unsupported == {}
    assert counted.params == sum(p.numel() for p in resnet18().parameters())


def test_resnet18_overhead_covers_every_kr_part(kr_resnet):
    x = torch.randn(1, 3, 64, 64)  # layer4 on 2×2 maps, where every tap of its kernels is live
    overhead = count_overhead(kr_resnet, x)
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        kr_resnet.eval()(x)
    shared = sum(v for op, v in overhead.kr.by_operator.items() if op in SHARED_OPS)
    assert shared * 2 == pytest.approx(reference.get_total_flops(), rel=1e-6)
    assert overhead.kr.unsupported == {} and overhead.static.unsupported == {}
    kr = overhead.kr.by_module
    assert kr["stem"] > 0 and kr["head"] > 0  # FFT stem, joint head
    rows = {row.name: row for row in overhead.layers}
    assert len(rows) == 19 + 2
    conv = rows["layer4.1.conv2"]
    # Attention, fusion and representation (the generator) and applying 4 candidates of 512·512·9
    # weights (on 2×2 maps: the convolution with every candidate, 4 · 4 positions, instead of
    # mixing per-sample kernels) are all counted on top of the static convolution.
    assert conv.generator_macs > 0
    assert conv.added_macs - conv.generator_macs >= 3 * 4 * 512 * 512 * 9
    assert overhead.kr.total - overhead.static.total == sum(r.added_macs for r in overhead.layers)
    assert overhead.overhead_pct > 0
    assert overhead.table(3).caption.endswith("Every operator counted.")


def test_model_without_kr_layers_has_zero_overhead():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    overhead = count_overhead(model, torch.zeros(1, 3, 8, 8))
    assert overhead.overhead_pct == 0.0
    assert overhead.kr.total == overhead.static.total == 8 * 27 * 36 + 8 * 36 * 2


def test_static_counterpart_is_temporary():
    kr = kr_convert(tiny_cnn(), input_size=20)
    holder = nn.ModuleDict({"net": kr})
    with static_counterpart(holder) as static:
        assert type(static.net[1]) is nn.Conv2d
    assert holder.net is kr


def test_counting_restores_every_modules_mode():
    model = kr_convert(tiny_cnn(), input_size=20).train()
    model.backbone[4].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    count_macs(model, torch.randn(1, 3, 20, 20))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


class Cumulative(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1).flatten(1)


def test_unsupported_operators_are_listed():
    counted = count_macs(Cumulative(), torch.randn(1, 3, 4, 4))
    assert counted.unsupported == {"aten::cumsum": 1}


@pytest.mark.slow
def test_resnet18_224_figures():
    """The figures of the speed issue: resnet18, input 1×3×224×224."""
    x = torch.randn(1, 3, 224, 224)
    gmacs = {}
    for mode, n in (("kr", 1), ("kr", 4), ("odconv", 1), ("odconv", 4)):
        overhead = count_overhead(kr_convert(resnet18(), kernel_num=n, mode=mode), x)
        assert overhead.static.gmacs == pytest.approx(1.82, abs=0.005)
        assert overhead.kr.unsupported == {}
        gmacs[mode, n] = overhead.kr.gmacs
    assert 1.82 < gmacs["odconv", 1] < gmacs["kr", 1] < 1.86
    assert gmacs["kr", 1] < gmacs["odconv", 4] < gmacs["kr", 4] < 1.95


def test_the_old_module_path_is_an_alias():
    with pytest.warns(DeprecationWarning, match="lightning_kr.utilities.mac_count"):
        old = importlib.reload(importlib.import_module("lightning_kr.callbacks.mac_count"))
    assert old.count_macs is count_macs and old.static_counterpart is static_counterpart
