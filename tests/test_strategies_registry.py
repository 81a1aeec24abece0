"""The strategy registry: what each strategy declares, how one is picked, and a forced strategy
checked at conversion (naming the layer) rather than at the first forward pass."""

import importlib

import pytest
import torch
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.conversion.create import layer_strategy
from lightning_kr.layers import KRConv2d
from lightning_kr.layers.dynamic_conv import STRATEGIES, dynamic_conv2d, portable_strategy
from lightning_kr.layers.dynamic_conv3d import STRATEGIES_3D, dynamic_conv3d
from lightning_kr.strategies import ConvGeometry, ConvStrategy, registry
from lightning_kr.strategies.shared import Shared


@pytest.mark.parametrize("strategy", registry.REGISTRY, ids=lambda s: s.name)
def test_each_strategy_declares_what_it_is_for_its_cost_and_portability(strategy):
    module = importlib.import_module(type(strategy).__module__)
    doc = module.__doc__
    assert doc.startswith(f'"""``"{strategy.name}"``') or doc.startswith(f'``"{strategy.name}"``')
    assert "For:" in doc and "Cost" in doc and "ortable" in doc
    assert strategy.dims and strategy.dims <= {2, 3}


def test_names_come_from_the_registry_without_duplicates():
    assert len(set(registry.names())) == len(registry.REGISTRY)
    assert registry.names(2) == STRATEGIES
    assert registry.names(3) == STRATEGIES_3D
    assert "taps" in STRATEGIES and "tap_products" in STRATEGIES_3D


def _geometry(batch, stride=1, groups=1, kernel=3, kernel_num=4, side=8):
    out = (side + 2 * (kernel // 2) - kernel) // stride + 1
    attentions = {"spatial", "kernel"} if kernel_num > 1 else {"spatial"}
    return ConvGeometry(
        (kernel_num, 64, 64 // groups, kernel, kernel), (stride, stride), (1, 1), groups,
        frozenset(attentions), batch, (side, side), (out, out), (kernel // 2, kernel // 2),
    )  # fmt: skip


def test_auto_is_the_cheapest_applicable_and_export_the_cheapest_portable():
    for geometry in (_geometry(32), _geometry(1), _geometry(32, stride=2), _geometry(8, groups=2)):
        chosen = registry.choose(geometry)
        costs = [
            s.cost(geometry)
            for s in registry.strategies(2)
            if s.applies(geometry) is None and s.cost(geometry) is not None
        ]
        assert chosen.cost(geometry) == min(costs)
        portable = registry.choose(geometry.any_batch(), portable=True)
        assert portable.portable and portable.applies(geometry) is None
    assert portable_strategy(True, True) == "conv_columns"
    assert portable_strategy(True, True, stride=(2, 2)) == "conv_columns"
    assert portable_strategy(False, False) == "shared"


def test_a_forced_strategy_is_checked_against_every_layer_at_conversion():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 4),
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"cannot run layer '4' \(Conv2d, stride \(2, 2\).*stride 1"
    ):
        kr_convert(net, input_size=8, strategy="taps")
    with pytest.raises(ValueError, match=r"cannot run layer '2'.*needs n = 1"):
        kr_convert(net, input_size=8, strategy="tap_scaled", kernel_num=4)
    kr_convert(net, input_size=8, strategy="taps", exclude="4")  # the others can run it


def test_the_old_3d_name_taps_is_the_renamed_strategy():
    with pytest.warns(FutureWarning, match="now called 'tap_products'"):
        assert layer_strategy("taps", 3) == "tap_products"
    assert layer_strategy("taps", 2) == "taps"
    assert layer_strategy("unfold", 3) == "auto"  # a 2-D-only strategy: 3-D layers choose
    x, weight = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 5, 3, 3, 3, 3)
    options = dict(
        channel_att=None, filter_att=None, spatial_att=torch.rand(2, 27),
        kernel_att=torch.rand(2, 2), bias=None, stride=(1, 1, 1), padding=(1,) * 6,
        dilation=(1, 1, 1), groups=1,
    )  # fmt: skip
    with pytest.warns(FutureWarning):
        old = dynamic_conv3d(x, weight, strategy="taps", **options)
    torch.testing.assert_close(old, dynamic_conv3d(x, weight, strategy="grouped", **options))
    with pytest.raises(ValueError, match="unknown strategy 'unfold'"):
        dynamic_conv3d(x, weight, strategy="unfold", **options)  # a 2-D strategy


class _Ones(ConvStrategy):
    """A strategy that claims to cost nothing (for the test below)."""

    name = "ones"
    dims = frozenset({2})

    def cost(self, geometry):
        return 0

    def convolve(self, x, weight, att, bias, g):
        return Shared().convolve(x, weight[:1], att, bias, g)


def test_adding_a_strategy_is_one_registry_entry(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, _Ones()))
    layer = KRConv2d(4, 4, 3, padding=1, kernel_num=2, repr_dim=0)
    x = torch.randn(2, 4, 5, 5)
    options = dict(
        channel_att=None, filter_att=None, spatial_att=None, kernel_att=None, bias=None,
        stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1,
    )  # fmt: skip
    geometry = ConvGeometry(
        tuple(layer.weight.shape), (1, 1), (1, 1), 1, frozenset(), 2, (5, 5), (5, 5), (1, 1)
    )
    assert registry.choose(geometry).name == "ones"
    auto = dynamic_conv2d(x, layer.weight, strategy="auto", **options)
    shared = dynamic_conv2d(x, layer.weight[:1], strategy="shared", **options)
    torch.testing.assert_close(auto, shared)


def test_auto_chooses_under_the_tracer_that_counts_macs():
    """fvcore traces the model: the sizes the costs read are traced values there."""
    layer = KRConv2d(4, 6, 3, stride=2, padding=1, repr_dim=0).eval()
    x = torch.randn(3, 4, 8, 8)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, t):
            return self.layer.forward_with_repr(t, None)[0]

    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(Wrapper(), x)
        torch.testing.assert_close(traced(x), layer.forward_with_repr(x, None)[0])
