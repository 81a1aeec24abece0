"""Every convolution strategy against the naive per-sample reference, on random layer configurations.

Property-based (hypothesis), over every 2-D strategy of the registry: kernel sizes 1–4 (even and non-square), stride, dilation, groups
(grouped and depthwise), every padding form and mode, batch 1–5, maps down to 1×1, n = 1–4 and any
subset of attentions. Each applicable strategy must give the reference's values and gradients, and
its output must survive an in-place operation of the next layer (``ReLU(inplace=True)``). The CI
test runs a fixed, bounded set of examples; the slow one draws many more.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_kr.conversion.create import layer_geometry
from lightning_kr.layers import KRConv2d
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS
from lightning_kr.strategies import registry
from tests.reference import per_sample_kernels

ATTENTION_SUBSETS = [
    subset
    for r in range(len(ATTENTION_KINDS) + 1)
    for subset in itertools.combinations(ATTENTION_KINDS, r)
]


@st.composite
def layer_configs(draw) -> dict:
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    grouping = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if grouping == "dense":
        groups, c_in, c_out = 1, draw(st.integers(1, 5)), draw(st.integers(1, 5))
    elif grouping == "grouped":
        groups = draw(st.integers(2, 3))
        c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    else:
        groups = c_in = c_out = draw(st.integers(2, 5))
    kernel_num = draw(st.integers(1, 4))
    padding_form = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    stride = (
        (1, 1) if padding_form == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    )
    padding = {
        "int": draw(st.integers(0, 2)),
        "pair": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        "same": "same",
        "valid": "valid",
    }[padding_form]
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad = {"int": (padding, padding), "pair": padding, "valid": (0, 0)}.get(
        padding_form, (dh * (kh - 1) // 2 + 1, dw * (kw - 1) // 2 + 1)
    )
    # The smallest map that leaves one output position (and that reflect / circular padding accept).
    min_h = max(1, dh * (kh - 1) + 1 - 2 * pad[0], pad[0] + 1 if padding_mode != "zeros" else 1)
    min_w = max(1, dw * (kw - 1) + 1 - 2 * pad[1], pad[1] + 1 if padding_mode != "zeros" else 1)
    return {
        "layer": {
            "in_channels": c_in,
            "out_channels": c_out,
            "kernel_size": (kh, kw),
            "stride": stride,
            "padding": padding,
            "dilation": (dh, dw),
            "groups": groups,
            "bias": draw(st.booleans()),
            "padding_mode": padding_mode,
            "kernel_num": kernel_num,
            "attentions": draw(
                st.sampled_from(ATTENTION_SUBSETS).filter(
                    lambda a: kernel_num == 1 or "kernel" in a
                )
            ),
        },
        "batch": draw(st.integers(1, 5)),
        "size": (draw(st.integers(min_h, min_h + 4)), draw(st.integers(min_w, min_w + 4))),
    }


def applicable_strategies(layer: KRConv2d) -> list[str]:
    """Every registered 2-D strategy that applies to the layer (the registry says which)."""
    geometry = layer_geometry(layer)
    return [s.name for s in registry.strategies(2) if s.applies(geometry) is None]


def reference_forward(layer: KRConv2d, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One ``nn.Conv2d`` call per sample with that sample's explicit kernel (torch's own padding)."""
    att = layer.generator(x.mean(dim=(2, 3)), d)
    kernels = per_sample_kernels(layer.weight, att, layer.groups, x.shape[0])
    conv = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
    ).double()  # fmt: skip
    return torch.cat(
        [conv._conv_forward(x[b : b + 1], kernels[b], layer.bias) for b in range(x.shape[0])]
    )


def check_every_strategy(config: dict) -> list[str]:
    """Assert every applicable strategy against the reference; return the strategies checked."""
    torch.manual_seed(0)
    layer = KRConv2d(**config["layer"], repr_dim=3, min_hidden=4, zero_init=False).double()
    x = torch.randn(config["batch"], layer.in_channels, *config["size"], dtype=torch.double)
    x.requires_grad_(True)
    d = torch.randn(config["batch"], 3, dtype=torch.double, requires_grad=True)
    expected = torch.relu(reference_forward(layer, x, d))
    inputs = (x, d, layer.weight, layer.generator.fuse.weight)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, inputs, grad_out, materialize_grads=True)
    strategies = applicable_strategies(layer)
    for name in strategies:
        layer.strategy = name
        y, _ = layer.forward_with_repr(x, d)
        y = torch.relu_(y)  # what ReLU(inplace=True) after the layer does
        torch.testing.assert_close(y, expected, msg=lambda m, name=name: f"{name}: {m}")
        got = torch.autograd.grad(y, inputs, grad_out, materialize_grads=True)
        for g, w, what in zip(got, want, ("x", "d", "weight", "generator"), strict=True):
            torch.testing.assert_close(g, w, msg=lambda m, n=name, w_=what: f"{n}, d/d{w_}: {m}")
    return strategies


FAST = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(layer_configs())
def test_every_strategy_equals_the_reference_and_survives_inplace(config):
    assert {"grouped", "folded", "unfold", "candidate_outputs", "reference"} <= set(
        check_every_strategy(config)
    )


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(layer_configs())
def test_every_strategy_equals_the_reference_many_examples(config):
    assert {"grouped", "folded", "unfold", "candidate_outputs", "reference"} <= set(
        check_every_strategy(config)
    )


@pytest.mark.parametrize("strategy", [s for s in registry.names(2) if s not in ("shared", "taps")])
def test_vgg_like_block_trains_with_inplace_relu_at_224(strategy):
    """The case fuzzing at small sizes missed: a 224×224 map, then ReLU(inplace=True), then backward."""
    kernel_num = 1 if strategy == "tap_scaled" else 2
    layer = KRConv2d(
        3, 8, 3, padding=1, kernel_num=kernel_num, repr_dim=3, zero_init=False, strategy=strategy
    )
    x = torch.randn(2, 3, 224, 224)
    y, _ = layer.forward_with_repr(x, torch.randn(2, 3))
    nn.ReLU(inplace=True)(y).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
