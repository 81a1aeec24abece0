"""The recomputing autograd Functions: exact gradients, batch chunking, and what they keep."""

import pytest
import torch

from lightning_kr.layers import KRConv2d
from lightning_kr.strategies import memory
from lightning_kr.strategies.folded import FoldedGroupedConv
from lightning_kr.strategies.memory import batch_chunks
from lightning_kr.strategies.taps import TapsConv
from lightning_kr.strategies.unfold import UnfoldConv
from tests.reference import assert_same_values_and_gradients, naive_dynamic_conv2d


def _attentions(batch, c_in, c_out, taps, n, present=True):
    def sig(*shape):
        return torch.rand(*shape, dtype=torch.double).add(0.2).requires_grad_()

    kernel = torch.softmax(torch.randn(batch, n, dtype=torch.double), -1).requires_grad_()
    return (
        sig(batch, c_in) if present else None,
        sig(batch, c_out) if present else None,
        sig(batch, taps) if present else None,
        kernel if n > 1 else None,
    )


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize("spatial", [True, False])
def test_taps_gradcheck(kernel_num, spatial):
    x = torch.randn(2, 3, 5, 4, dtype=torch.double, requires_grad=True)
    weight = torch.randn(kernel_num, 4, 3, 3, 3, dtype=torch.double, requires_grad=True)
    _, _, att_s, att_k = _attentions(2, 3, 4, 9, kernel_num)
    att_s = att_s if spatial else None

    def run(x, weight, att_k, att_s):
        return TapsConv.apply(x, weight, att_k, att_s, (1, 1), (1, 1), (5, 4))

    assert torch.autograd.gradcheck(run, (x, weight, att_k, att_s))


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize(
    ("stride", "groups", "k"), [((2, 2), 1, 3), ((1, 1), 2, 3), ((2, 1), 1, 1)]
)
def test_unfold_gradcheck(kernel_num, stride, groups, k):
    x = torch.randn(2, 4, 6, 5, dtype=torch.double, requires_grad=True)
    weight = torch.randn(kernel_num, 6, 4 // groups, k, k, dtype=torch.double, requires_grad=True)
    _, _, att_s, att_k = _attentions(2, 4, 6, k * k, kernel_num)
    att_s = att_s if k > 1 else None
    pad = k // 2
    out_hw = ((6 + 2 * pad - k) // stride[0] + 1, (5 + 2 * pad - k) // stride[1] + 1)

    def run(x, weight, att_k, att_s):
        return UnfoldConv.apply(x, weight, att_k, att_s, stride, (pad, pad), (1, 1), groups, out_hw)

    assert torch.autograd.gradcheck(run, (x, weight, att_k, att_s))


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_folded_gradcheck(kernel_num, groups):
    x = torch.randn(2, 4, 5, 5, dtype=torch.double, requires_grad=True)
    weight = torch.randn(kernel_num, 6, 4 // groups, 3, 3, dtype=torch.double, requires_grad=True)
    bias = torch.randn(6, dtype=torch.double, requires_grad=True)
    att_c, att_f, att_s, att_k = _attentions(2, 4, 6, 9, kernel_num)

    def run(x, weight, att_c, att_f, att_s, att_k, bias):
        return FoldedGroupedConv.apply(
            x, weight, att_c, att_f, att_s, att_k, bias, (2, 1), (1, 1), (1, 1), groups
        )

    assert torch.autograd.gradcheck(run, (x, weight, att_c, att_f, att_s, att_k, bias))


def test_batch_chunks_cover_the_batch_within_the_budget():
    chunks = batch_chunks(10, per_sample_elements=memory.CHUNK_BYTES // 12, element_size=4)
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert batch_chunks(4, per_sample_elements=10**12, element_size=4)[0] == slice(0, 1)


@pytest.mark.parametrize(
    ("strategy", "kernel_num"),
    [("taps", 1), ("taps", 4), ("unfold", 1), ("unfold", 4), ("folded", 1), ("folded", 4),
     ("tap_scaled", 1)],
)  # fmt: skip
def test_one_sample_chunks_match_the_reference(monkeypatch, strategy, kernel_num):
    """With a tiny chunk budget every sample is its own chunk; results do not change."""
    monkeypatch.setattr(memory, "CHUNK_BYTES", 1)
    layer = KRConv2d(
        4, 6, 3, 1, 1, kernel_num=kernel_num, repr_dim=5, min_hidden=4, zero_init=False
    )
    layer = layer.double()
    layer.strategy = strategy
    x = torch.randn(3, 4, 6, 6, dtype=torch.double, requires_grad=True)
    d = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    y, _ = layer.forward_with_repr(x, d)
    att = layer.generator(x.mean(dim=(2, 3)), d)
    expected = naive_dynamic_conv2d(x, layer.weight, att, None, (1, 1), (1, 1), (1, 1), 1)
    assert_same_values_and_gradients(y, expected, (x, d, layer.weight))


@pytest.mark.parametrize("strategy", ["taps", "unfold", "folded"])
def test_training_keeps_no_per_sample_kernels_or_partial_sums(strategy):
    """What autograd keeps for a 4-candidate layer is input-sized: no B × |W| kernels, no
    k² partial sums, no im2col columns."""
    batch, channels, size = 8, 32, 6
    layer = KRConv2d(channels, channels, 3, 1, 1, kernel_num=4, repr_dim=0, strategy=strategy)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    per_sample_kernels = batch * layer.weight[0].numel()
    assert max(largest) < per_sample_kernels
    assert max(largest) <= max(x.numel(), layer.weight.numel())
