"""``"conv_columns"``, the form exported graphs take: one-hot columns (a ``Conv`` node) and one batched
product (a ``MatMul`` node), every attention placed where it touches the fewest numbers.

How it is used: nobody calls it by hand; under ``torch.export`` (``lightning_kr.export.to_onnx``)
every KR layer with per-sample kernels runs it (or ``"taps"`` on the tiniest maps)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.strategies import ConvAttentions, ConvGeometry, registry
from lightning_kr.strategies.conv_columns import ROWS_MAP, conv_columns, one_hot_columns
from lightning_kr.strategies.kernels import fold_channel_filter, mix_candidates


def _reference(x, weight, att, bias, stride, padding, dilation, groups):
    """One ``F.conv2d`` per sample with that sample's explicit kernel."""
    kernels = mix_candidates(weight, att.kernel, att.spatial, x.shape[0])
    kernels = fold_channel_filter(kernels, att.channel, att.filter, groups)
    return torch.cat(
        [
            F.conv2d(x[b : b + 1], kernels[b], bias, stride, padding, dilation, groups)
            for b in range(x.shape[0])
        ]
    )


@pytest.mark.parametrize(
    ("groups", "kernel", "stride", "dilation", "side"),
    [
        (1, 3, 1, 1, 9),  # per-sample kernels (large map)
        (1, 3, 2, 1, 8),  # strided
        (2, 3, 1, 2, 7),  # grouped, dilated
        (4, 3, 1, 1, 6),  # depthwise
        (1, 3, 1, 1, 2),  # 2×2 map: one product over the batch's rows
        (1, 3, 1, 1, 1),  # 1×1 map: only the centre tap is live
        (1, 1, 2, 1, 5),  # 1×1 kernel, strided
        (1, 5, 3, 1, 4),  # taps that read only padding at stride 3
    ],
)
@pytest.mark.parametrize("kernel_num", [1, 3])
def test_equals_the_per_sample_reference(groups, kernel, stride, dilation, side, kernel_num):
    torch.manual_seed(0)
    c_in, c_out, batch = 4, 8, 3
    pad = (kernel // 2) * dilation
    x = torch.randn(batch, c_in, side, side, dtype=torch.float64)
    weight = torch.randn(kernel_num, c_out, c_in // groups, kernel, kernel, dtype=torch.float64)
    for present in itertools.product([False, True], repeat=3):
        channel, filt, spatial = present
        att = ConvAttentions(
            torch.rand(batch, c_in, dtype=torch.float64) + 0.5 if channel else None,
            torch.rand(batch, c_out, dtype=torch.float64) + 0.5 if filt else None,
            torch.rand(batch, kernel * kernel, dtype=torch.float64) + 0.5 if spatial else None,
            torch.softmax(torch.randn(batch, kernel_num, dtype=torch.float64), 1)
            if kernel_num > 1
            else None,
        )
        bias = torch.randn(c_out, dtype=torch.float64)
        want = _reference(x, weight, att, bias, stride, pad, dilation, groups)
        got = conv_columns(
            x, weight, att, bias, (stride,) * 2, (pad,) * 2, (dilation,) * 2, groups,
            tuple(want.shape[-2:]),
        )  # fmt: skip
        torch.testing.assert_close(got, want, msg=lambda m, p=present: f"{p}: {m}")


def test_one_hot_columns_are_unfolds_columns_exactly():
    x = torch.randn(2, 3, 7, 6)
    for kernel, stride, padding, dilation in [
        ((3, 3), 1, 1, 1),
        ((2, 3), 2, 0, 2),
        ((1, 1), 2, 0, 1),
    ]:
        cols = one_hot_columns(x, kernel, (stride,) * 2, (padding,) * 2, (dilation,) * 2)
        want = F.unfold(x, kernel, dilation, padding, stride)
        assert torch.equal(cols.flatten(2), want)


def test_export_takes_conv_columns_for_per_sample_kernels_and_taps_on_the_tiniest_maps():
    def geometry(side, kernel_num=1, attentions=("spatial",)):
        kinds = frozenset(attentions) | ({"kernel"} if kernel_num > 1 else set())
        return ConvGeometry(
            (kernel_num, 64, 64, 3, 3), (1, 1), (1, 1), 1, kinds, None, (side, side),
            (side, side), (1, 1),
        )  # fmt: skip

    def exported(g):
        return registry.choose(g, portable=True).name

    assert exported(geometry(56)) == "conv_columns"
    assert exported(geometry(7, kernel_num=4)) == "conv_columns"
    assert exported(geometry(2)) == "taps"  # one candidate, 2×2: the shifted sums win
    assert exported(geometry(2, kernel_num=4)) == "conv_columns"
    assert exported(geometry(1)) == "conv_columns"  # the centre tap alone
    assert exported(geometry(56, attentions=("channel", "filter"))) == "shared"
    assert ROWS_MAP == 4


def test_a_converted_cnn_under_export_runs_conv_columns(monkeypatch):
    """The strategy each layer records under ``torch.export`` (the graph must serve any batch)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    model = kr_convert(net, input_size=16, kernel_num=2).eval()
    recorded = []
    original = registry.select

    def spy(name, geometry):
        chosen = original(name, geometry)
        recorded.append(chosen.name)
        return chosen

    monkeypatch.setattr(registry, "select", spy)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        # KRModel.forward(*args) takes the original model's arguments: one tuple of inputs.
        torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=(({0: batch},),))
    assert recorded and set(recorded) == {"conv_columns"}


@pytest.mark.parametrize("kernel_num", [1, 3])
def test_a_map_where_every_tap_reads_padding_gives_the_bias(kernel_num):
    """A 1×1 input, stride 2 along the width and padding 1: no output position of that row reads
    the input, so no tap is live (found by hypothesis; this used to build a convolution with no
    output channel). The output is the bias, and the attentions stay in the graph with zero
    gradients, as in every other strategy."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 1, requires_grad=True)
    weight = torch.randn(kernel_num, 4, 3, 1, 1, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    filter_att = torch.rand(2, 4, requires_grad=True)
    kernel_att = torch.softmax(torch.randn(2, kernel_num), 1) if kernel_num > 1 else None
    att = ConvAttentions(None, filter_att, None, kernel_att)
    y = conv_columns(x, weight, att, bias, (1, 2), (1, 1), (1, 1), 1, (3, 2))
    torch.testing.assert_close(y, bias.detach()[None, :, None, None].expand(2, 4, 3, 2))
    grads = torch.autograd.grad(y.sum(), (x, weight, filter_att, bias), allow_unused=True)
    assert grads[0] is None or grads[0].abs().max() == 0
    assert grads[1].abs().max() == 0 and grads[2].abs().max() == 0  # in the graph, zero
    torch.testing.assert_close(grads[3], torch.full((4,), 12.0))  # 2 samples × 3 × 2 positions
