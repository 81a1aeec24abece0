"""``KRConv1d`` and ``KRConv3d`` against a naive per-sample reference, and against their static layers.

``KRConv1d`` runs the 2-D math on a height-1 map, so every 2-D strategy is checked; ``KRConv3d`` has
its own strategies (:mod:`~lightning_kr.layers.dynamic_conv3d`).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kr.layers import ReprChain
from lightning_kr.layers.dynamic_conv import STRATEGIES
from lightning_kr.layers.dynamic_conv3d import STRATEGIES_3D
from lightning_kr.layers.kr_conv1d import KRConv1d
from lightning_kr.layers.kr_conv3d import KRConv3d
from tests.reference import assert_same_values_and_gradients, per_sample_kernels, trained_looking

REPR_DIM = 5

# in, out, kernel, stride, padding, dilation, groups, batch
CASES_1D = [
    (4, 6, 3, 1, 1, 1, 1, 3),
    (4, 6, 5, 2, 2, 1, 2, 1),
    (4, 4, 3, 2, 1, 1, 4, 3),  # depthwise
    (4, 4, 3, 1, "same", 2, 4, 1),  # depthwise, dilated
    (3, 5, 1, 1, 0, 1, 1, 3),
]
CASES_3D = [
    (4, 6, 3, 1, 1, 1, 1, 3),
    (4, 6, (3, 1, 3), 2, (1, 0, 1), 1, 2, 1),
    (4, 4, 3, 2, 1, 1, 4, 3),  # depthwise
    (4, 4, (1, 3, 3), 1, "same", (1, 2, 1), 4, 1),  # depthwise, dilated
    (3, 5, 1, 1, 0, 1, 1, 3),
]
LENGTH = 11
VIDEO = (5, 7, 6)  # T, H, W


def _applicable(kernel_num: int, case: tuple, strategy: str) -> bool:
    """'shared' needs no per-sample kernel (n = 1, one tap); 'tap_scaled' needs n = 1; 'taps'
    needs stride 1 and groups 1."""
    one_tap = case[2] in (1, (1, 1, 1))
    if strategy == "shared":
        return kernel_num == 1 and one_tap
    if strategy == "tap_scaled":
        return kernel_num == 1
    if strategy == "taps":
        return case[3] == 1 and case[6] == 1
    return True


def _reference_cases(cases: list, strategies: tuple[str, ...]) -> list:
    return [
        pytest.param(kernel_num, case, strategy, id=f"n{kernel_num}-{case}-{strategy}")
        for kernel_num in (1, 4)
        for case in cases
        for strategy in ("auto", *strategies)
        if _applicable(kernel_num, case, strategy)
    ]


def _moved_off_neutral(layer: nn.Module) -> nn.Module:
    """``layer`` in double precision with noisy generator parameters: every attention matters."""
    torch.manual_seed(1)
    return trained_looking(layer.double(), scale=1.0)


@pytest.mark.parametrize(("kernel_num", "case", "strategy"), _reference_cases(CASES_1D, STRATEGIES))
def test_conv1d_matches_naive_per_sample_reference(kernel_num, case, strategy):
    c_in, c_out, k, stride, padding, dilation, groups, batch = case
    layer = KRConv1d(
        c_in, c_out, k, stride, padding, dilation, groups, kernel_num=kernel_num,
        repr_dim=REPR_DIM, min_hidden=4, strategy=strategy,
    )  # fmt: skip
    layer = _moved_off_neutral(layer)
    x = torch.randn(batch, c_in, LENGTH, dtype=torch.double, requires_grad=True)
    d = torch.randn(batch, REPR_DIM, dtype=torch.double, requires_grad=True)
    y, _ = layer.forward_with_repr(x, d)
    expected = _naive_conv(layer, x, d, F.conv1d)
    assert y.shape == expected.shape
    assert_same_values_and_gradients(y, expected, (x, d, layer.weight))


@pytest.mark.parametrize(
    ("kernel_num", "case", "strategy"), _reference_cases(CASES_3D, STRATEGIES_3D)
)
def test_conv3d_matches_naive_per_sample_reference(kernel_num, case, strategy):
    c_in, c_out, k, stride, padding, dilation, groups, batch = case
    layer = KRConv3d(
        c_in, c_out, k, stride, padding, dilation, groups, kernel_num=kernel_num,
        repr_dim=REPR_DIM, min_hidden=4, strategy=strategy,
    )  # fmt: skip
    layer = _moved_off_neutral(layer)
    x = torch.randn(batch, c_in, *VIDEO, dtype=torch.double, requires_grad=True)
    d = torch.randn(batch, REPR_DIM, dtype=torch.double, requires_grad=True)
    y, _ = layer.forward_with_repr(x, d)
    expected = _naive_conv(layer, x, d, F.conv3d)
    assert y.shape == expected.shape
    assert_same_values_and_gradients(y, expected, (x, d, layer.weight))


def _naive_conv(layer, x, d, conv) -> torch.Tensor:
    """One ``conv`` per sample with the explicit kernel
    ``W_b = √n Σ_n a_kn[b,n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ V_n`` (attentions from ``layer.generator``)."""
    att = layer.generator(x.mean(dim=tuple(range(2, x.dim()))), d)
    n, c_out, c_in_g, *k = layer.weight.shape
    # tests.reference builds 2-D kernels: the taps, in row-major order, as (kt·kh or 1) × kw.
    as_2d = layer.weight.reshape(n, c_out, c_in_g, -1, k[-1])
    kernels = per_sample_kernels(as_2d, att, layer.groups).reshape(x.shape[0], c_out, c_in_g, *k)
    arguments = (layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return torch.cat([conv(x[b : b + 1], kernels[b], *arguments) for b in range(x.shape[0])])


STATIC = [
    (nn.Conv1d, KRConv1d, (2, 4, 9), dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv1d, KRConv1d, (2, 4, 9), dict(kernel_size=4, padding="same", padding_mode="reflect")),
    (nn.Conv1d, KRConv1d, (1, 4, 9), dict(kernel_size=3, padding=2, groups=4)),
    (nn.Conv1d, KRConv1d, (1, 4, 9), dict(kernel_size=3, padding=2, padding_mode="circular")),
    (nn.Conv3d, KRConv3d, (2, 4, 4, 6, 5), dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv3d, KRConv3d, (2, 4, 4, 6, 5), dict(kernel_size=(2, 3, 4), padding="same")),
    (nn.Conv3d, KRConv3d, (1, 4, 4, 6, 5), dict(kernel_size=3, padding=(1, 2, 1), groups=4)),
    (
        nn.Conv3d,
        KRConv3d,
        (1, 4, 4, 6, 5),
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
    ),
    (nn.Conv3d, KRConv3d, (2, 4, 4, 6, 5), dict(kernel_size=3, padding=1, padding_mode="reflect")),
]


@pytest.mark.parametrize(("static_cls", "kr_cls", "shape", "options"), STATIC)
def test_from_conv_computes_the_static_conv_and_round_trips(static_cls, kr_cls, shape, options):
    out_channels = 4 if options.get("groups") else 6
    conv = static_cls(4, out_channels, **options)
    kr = kr_cls.from_conv(conv, kernel_num=4, repr_dim=REPR_DIM)
    x, d = torch.randn(shape), torch.randn(shape[0], REPR_DIM)
    y, d_next = kr.forward_with_repr(x, d)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    assert d_next.shape == (shape[0], REPR_DIM)
    static = kr.to_static()
    assert type(static) is static_cls
    torch.testing.assert_close(static.weight, conv.weight)
    torch.testing.assert_close(static.bias, conv.bias)
    torch.testing.assert_close(static(x), conv(x))


IN_PLACE = [(KRConv1d, s, (3, 4, 7)) for s in ("auto", *STRATEGIES) if s != "shared"] + [
    (KRConv3d, s, (3, 4, 3, 5, 5)) for s in ("auto", *STRATEGIES_3D) if s != "shared"
]


@pytest.mark.parametrize(("kr_cls", "strategy", "shape"), IN_PLACE)
def test_in_place_relu_after_the_layer_trains(kr_cls, strategy, shape):
    kernel_num = 1 if strategy == "tap_scaled" else 4
    layer = kr_cls(4, 6, 3, padding=1, kernel_num=kernel_num, repr_dim=REPR_DIM, min_hidden=4)
    layer.strategy = strategy
    layer = trained_looking(layer)
    x = torch.randn(shape, requires_grad=True)
    y, d_next = layer.forward_with_repr(x, torch.randn(shape[0], REPR_DIM))
    (nn.ReLU(inplace=True)(y).sum() + d_next.sum()).backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("kr_cls", "good", "bad", "expected"),
    [
        (KRConv1d, (2, 4, 7), (2, 3, 7), r"layer1\.conv.*\(B, 4, L\)"),
        (KRConv1d, (2, 4, 7), (2, 4, 7, 7), r"\(B, 4, L\)"),
        (KRConv3d, (2, 4, 3, 5, 5), (2, 4, 5, 5), r"layer1\.conv.*\(B, 4, T, H, W\)"),
        (KRConv3d, (2, 4, 3, 5, 5), (2, 3, 3, 5, 5), r"\(B, 4, T, H, W\)"),
    ],
)
def test_bad_input_shape_names_the_expected_shape(kr_cls, good, bad, expected):
    layer = kr_cls(4, 6, 3, padding=1, repr_dim=REPR_DIM)
    chain = ReprChain()
    layer.attach(chain, "layer1.conv")
    with pytest.raises(ValueError, match=expected):
        layer(torch.randn(bad))
    with pytest.raises(ValueError, match=expected):
        layer.forward_with_repr(torch.randn(bad), torch.randn(2, REPR_DIM))
    with chain.run(torch.randn(2, REPR_DIM)):
        assert layer(torch.randn(good)).shape[:2] == (2, 6)


def test_constructor_errors():
    with pytest.raises(ValueError, match="strategy must be"):
        KRConv3d(4, 4, 3, strategy="unfold")
    with pytest.raises(ValueError, match="'same' is not supported for strided"):
        KRConv1d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="'shared' needs n = 1"):
        KRConv3d(4, 4, 3, repr_dim=0, strategy="shared").forward_with_repr(
            torch.randn(1, 4, 3, 3, 3), None
        )
