import pytest
import torch
from torch import nn

from lightning_kr.layers import KRConv2d, ReprChain
from lightning_kr.layers.dynamic_conv import STRATEGIES
from tests.reference import assert_same_values_and_gradients, naive_dynamic_conv2d

CASES = [
    # in, out, k, stride, padding, dilation, groups
    (8, 16, 3, 1, 1, 1, 1),
    (8, 16, 3, 2, 1, 1, 1),
    (8, 8, 3, 1, 2, 2, 1),
    (8, 16, 3, 1, 1, 1, 2),
    (8, 8, 3, 2, 1, 1, 8),  # depthwise
    (8, 16, 1, 1, 0, 1, 1),
    (6, 12, (1, 3), 1, (0, 1), 1, 3),
]


def test_equals_conv2d_with_neutral_attentions_and_kr_off():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    kr = KRConv2d.from_conv(conv, repr_dim=0, gate_scale=2.0, zero_init=True)
    x = torch.randn(3, 8, 10, 10)
    y, d = kr.forward_with_repr(x, None)
    assert d is None
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)


def test_equals_conv2d_when_attentions_forced_to_one():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    kr = KRConv2d.from_conv(conv, repr_dim=0)
    kr.generator.forward = _forced_ones(kr.generator.forward)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(kr.forward_with_repr(x, None)[0], conv(x), rtol=1e-5, atol=1e-5)


def _forced_ones(forward):
    def wrapped(h, d):
        att = forward(h, d)
        for field in ("channel", "filter", "spatial"):
            value = getattr(att, field)
            if value is not None:
                setattr(att, field, torch.ones_like(value))
        return att

    return wrapped


def _applicable(kernel_num: int, case: tuple, strategy: str) -> bool:
    """'shared' needs no per-sample kernel (n = 1, 1x1); 'tap_scaled' needs n = 1;
    'taps' needs stride 1 and groups 1."""
    one_by_one = case[2] == 1
    if strategy == "shared":
        return kernel_num == 1 and one_by_one
    if strategy == "tap_scaled":
        return kernel_num == 1
    if strategy == "taps":
        return case[3] == 1 and case[6] == 1
    return True


REFERENCE_CASES = [
    (kernel_num, case, strategy)
    for kernel_num in (1, 4)
    for case in CASES
    for strategy in ("auto", *STRATEGIES)
    if _applicable(kernel_num, case, strategy)
]


@pytest.mark.parametrize(("kernel_num", "case", "strategy"), REFERENCE_CASES)
def test_matches_naive_per_sample_reference(kernel_num, case, strategy):
    c_in, c_out, k, stride, padding, dilation, groups = case
    layer = KRConv2d(
        c_in,
        c_out,
        k,
        stride,
        padding,
        dilation,
        groups,
        bias=True,
        kernel_num=kernel_num,
        repr_dim=6,
        min_hidden=4,
        zero_init=False,  # random attentions: every attention is applied and checked
        strategy=strategy,
    ).double()
    x = torch.randn(3, c_in, 11, 11, dtype=torch.double, requires_grad=True)
    d = torch.randn(3, 6, dtype=torch.double, requires_grad=True)
    y, _ = layer.forward_with_repr(x, d)

    att = layer.generator(x.mean(dim=(2, 3)), d)
    expected = naive_dynamic_conv2d(
        x, layer.weight, att, layer.bias, layer.stride, layer.padding, layer.dilation, groups
    )
    assert_same_values_and_gradients(y, expected, (x, d, layer.weight))


def test_padding_same_and_reflect():
    for padding, mode in [("same", "zeros"), (1, "reflect"), ("same", "circular")]:
        conv = nn.Conv2d(4, 6, (2, 3), padding=padding, padding_mode=mode, bias=False)
        kr = KRConv2d.from_conv(conv, repr_dim=0, gate_scale=2.0, zero_init=True)
        x = torch.randn(2, 4, 7, 8)
        torch.testing.assert_close(kr.forward_with_repr(x, None)[0], conv(x), rtol=1e-5, atol=1e-5)


def test_changing_d_changes_output_only_when_kr_is_on():
    x = torch.randn(2, 8, 6, 6)
    on = KRConv2d(8, 8, 3, padding=1, repr_dim=5, kernel_num=4, zero_init=False)
    y1, _ = on.forward_with_repr(x, torch.randn(2, 5))
    y2, _ = on.forward_with_repr(x, torch.randn(2, 5))
    assert not torch.allclose(y1, y2)
    off = KRConv2d(8, 8, 3, padding=1, repr_dim=0, kernel_num=4)
    assert torch.equal(
        off.forward_with_repr(x, torch.randn(2, 5))[0], off.forward_with_repr(x, None)[0]
    )


def test_d_next_depends_on_d_and_input():
    layer = KRConv2d(8, 8, 3, padding=1, repr_dim=5)
    x = torch.randn(2, 8, 6, 6)
    d = torch.randn(2, 5)
    _, d1 = layer.forward_with_repr(x, d)
    _, d2 = layer.forward_with_repr(x, torch.randn(2, 5))
    _, d3 = layer.forward_with_repr(torch.randn(2, 8, 6, 6), d)
    assert d1.shape == (2, 5)
    assert not torch.allclose(d1, d2)
    assert not torch.allclose(d1, d3)


def test_batch_size_one_trains():
    layer = KRConv2d(8, 8, 3, padding=1, repr_dim=5, kernel_num=4).train()
    y, d = layer.forward_with_repr(torch.randn(1, 8, 6, 6), torch.randn(1, 5))
    (y.sum() + d.sum()).backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_forward_reads_and_writes_the_chain():
    layer = KRConv2d(8, 8, 3, padding=1, repr_dim=5)
    chain = ReprChain()
    layer.attach(chain, "block.conv")
    x, d0 = torch.randn(2, 8, 6, 6), torch.randn(2, 5)
    with chain.run(d0):
        y = layer(x)
        d1 = chain.read("test", 2)
    y_ref, d_ref = layer.forward_with_repr(x, d0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(d1, d_ref)
    assert not chain.active


def test_errors_name_the_layer_and_expected_shape():
    layer = KRConv2d(8, 8, 3, padding=1, repr_dim=5)
    layer.attach(ReprChain(), "layer1.0.conv1")
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1.*\(B, 8, H, W\)"):
        layer(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        layer(torch.randn(8, 6, 6))
    with pytest.raises(RuntimeError, match="outside a KR forward pass"):
        layer(torch.randn(2, 8, 6, 6))


def test_inapplicable_strategy_is_an_error():
    layer = KRConv2d(4, 4, 3, padding=1, repr_dim=0, strategy="shared")
    with pytest.raises(ValueError, match="'shared' needs n = 1 and no spatial attention"):
        layer.forward_with_repr(torch.randn(2, 4, 5, 5), None)


def test_to_static_round_trip():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    kr = KRConv2d.from_conv(conv, kernel_num=4, repr_dim=3)
    static = kr.to_static()
    torch.testing.assert_close(static.weight, conv.weight)
    torch.testing.assert_close(static.bias, conv.bias)


def test_taps_strategy_traces_with_the_same_result():
    layer = KRConv2d(4, 6, 3, padding=1, repr_dim=0, strategy="taps").eval()
    x = torch.randn(2, 4, 5, 5)
    eager = layer.forward_with_repr(x, None)[0]

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, t):
            return self.layer.forward_with_repr(t, None)[0]

    traced = torch.jit.trace(Wrapper(), x)
    torch.testing.assert_close(traced(x), eager)
