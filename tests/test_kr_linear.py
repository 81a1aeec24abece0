import pytest
import torch
from torch import nn

from lightning_kr.layers import KRLinear


def naive_linear(x, layer, att):
    """Explicit per-sample weight W_b = √n sum_n a_kn · a_c ⊙ a_f ⊙ V_n; one F.linear per sample."""
    outs = []
    for b in range(x.shape[0]):
        w = sum(
            layer.weight[i]
            * (att.kernel[b, i] * layer.mix_scale if att.kernel is not None else 1.0)
            for i in range(layer.kernel_num)
        )
        if att.channel is not None:
            w = w * att.channel[b][None, :]
        if att.filter is not None:
            w = w * att.filter[b][:, None]
        outs.append(torch.nn.functional.linear(x[b], w, layer.bias))
    return torch.stack(outs)


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize("shape", [(3, 10), (3, 1, 10), (3, 7, 10), (3, 2, 4, 10)])
def test_matches_naive_reference(kernel_num, shape):
    layer = KRLinear(10, 6, kernel_num=kernel_num, repr_dim=5, min_hidden=4, zero_init=False)
    layer = layer.double()
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    d = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    y, d_next = layer.forward_with_repr(x, d)
    assert y.shape == (*shape[:-1], 6) and d_next.shape == (3, 5)
    tokens = x.reshape(3, -1, 10)
    att = layer.generator(tokens.mean(1), d)
    expected = naive_linear(tokens, layer, att).reshape(*shape[:-1], 6)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    for got, want in zip(
        torch.autograd.grad(y, (x, d, layer.weight), g),
        torch.autograd.grad(expected, (x, d, layer.weight), g),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


def test_neutral_conversion_equals_linear():
    linear = nn.Linear(12, 5)
    kr = KRLinear.from_linear(linear, kernel_num=4, repr_dim=3, gate_scale=2.0, zero_init=True)
    x = torch.randn(4, 9, 12)
    torch.testing.assert_close(
        kr.forward_with_repr(x, torch.randn(4, 3))[0], linear(x), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(kr.to_static().weight, linear.weight, rtol=1e-6, atol=1e-6)


def test_wrong_width_names_expected_shape():
    layer = KRLinear(12, 5, repr_dim=0)
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        layer.forward_with_repr(torch.randn(4, 11), None)
