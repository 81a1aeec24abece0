"""choose_strategy's decisions on ResNet-18 shapes, and the automatic choice against the reference."""

import pytest
import torch
import torch.nn.functional as F

from lightning_kr.layers import KRConv2d
from lightning_kr.layers.dynamic_conv import STRATEGIES, choose_strategy
from tests.reference import assert_same_values_and_gradients, naive_dynamic_conv2d


def _choice(batch, c_in, c_out, side, stride, k, n, padding=None):
    out = (side + 2 * (k // 2) - k) // stride + 1
    return choose_strategy(
        batch,
        torch.Size((n, c_out, c_in, k, k)),
        (out, out),
        has_kernel_att=n > 1,
        has_spatial_att=k > 1,
        stride=(stride, stride),
        in_hw=(side + 2 * (k // 2), side + 2 * (k // 2)) if padding is None else (side, side),
        padding=padding,
    )


@pytest.mark.parametrize(
    ("batch", "shape", "n", "expected"),
    [
        (32, (64, 64, 56, 1, 3), 1, "folded"),  # kernel smaller than the activations
        (32, (128, 128, 28, 1, 3), 4, "folded"),
        (32, (256, 256, 14, 1, 3), 1, "taps"),  # small map, stride 1
        (32, (256, 256, 14, 1, 3), 4, "taps"),
        (32, (512, 512, 7, 1, 3), 1, "taps"),
        (32, (512, 512, 7, 1, 3), 4, "unfold"),  # smallest map with several candidates
        (32, (256, 512, 14, 2, 3), 1, "candidate_outputs"),  # strided, 49 positions
        (32, (256, 512, 14, 2, 3), 4, "unfold"),
        (32, (256, 512, 14, 2, 1), 4, "unfold"),  # 1×1
        (32, (64, 128, 56, 2, 1), 1, "shared"),  # 1×1 at n = 1: an ordinary convolution
        (1, (64, 64, 56, 1, 3), 1, "folded"),
        (1, (256, 256, 14, 1, 3), 1, "grouped"),
        (1, (512, 512, 7, 1, 3), 1, "unfold"),  # columns under a quarter of the kernel
        (1, (512, 512, 7, 1, 3), 4, "unfold"),
    ],
)
def test_resnet18_shapes(batch, shape, n, expected):
    assert _choice(batch, *shape, n) == expected


@pytest.mark.parametrize(
    ("batch", "shape", "n", "expected"),
    [
        # ResNet-18 on 32×32 images: layer1 runs on 8², layer4 on 1².
        (50, (64, 64, 8, 1, 3), 4, "unfold"),  # 64 positions: mixing kernels is cheaper
        (50, (128, 128, 4, 1, 3), 4, "candidate_outputs"),  # 16 positions
        (50, (128, 256, 4, 2, 3), 4, "candidate_outputs"),
        (50, (256, 512, 2, 2, 1), 4, "candidate_outputs"),  # 1×1 kernel, 1 position
        (50, (512, 512, 1, 1, 3), 4, "candidate_outputs"),  # only the centre tap is live
        (1, (512, 512, 1, 1, 3), 4, "candidate_outputs"),
        (50, (512, 512, 1, 1, 3), 1, "candidate_outputs"),  # n = 1: the dropped taps decide
        (50, (256, 256, 2, 1, 3), 1, "taps"),  # every tap live
        (50, (128, 256, 4, 2, 3), 1, "candidate_outputs"),  # strided, 4 positions
        (32, (128, 256, 28, 2, 3), 1, "tap_scaled"),  # strided, 196 positions
        (50, (512, 512, 7, 1, 3), 4, "unfold"),  # 49 positions
    ],
)
def test_small_map_choice_by_counted_cost(batch, shape, n, expected):
    k = shape[-1]
    assert _choice(batch, *shape, n, padding=(k // 2, k // 2)) == expected


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize(("side", "stride"), [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_cifar_sized_maps_match_the_reference_where_candidate_outputs_is_chosen(
    batch, n, side, stride
):
    layer = KRConv2d(
        16, 16, 3, stride, 1, kernel_num=n, repr_dim=4, min_hidden=4, zero_init=False
    ).double()
    x = torch.randn(batch, 16, side, side, dtype=torch.double, requires_grad=True)
    d = torch.randn(batch, 4, dtype=torch.double)
    y, _ = layer.forward_with_repr(x, d)
    att = layer.generator(x.mean(dim=(2, 3)), d)
    expected = naive_dynamic_conv2d(x, layer.weight, att, None, (stride, stride), (1, 1), (1, 1), 1)
    assert_same_values_and_gradients(y, expected, (x, layer.weight))
    out = (side + 2 - 3) // stride + 1
    chosen = choose_strategy(
        batch,
        layer.weight.shape,
        (out, out),
        n > 1,
        True,
        (stride, stride),
        1,
        (side, side),
        (1, 1),
    )
    if n > 1 or side == 1 or stride == 2:
        assert chosen == "candidate_outputs"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel_num", [1, 4])
def test_auto_on_the_smallest_maps_matches_the_reference(batch, kernel_num):
    layer = KRConv2d(
        24, 24, 3, 1, 1, kernel_num=kernel_num, repr_dim=4, min_hidden=4, zero_init=False
    ).double()
    x = torch.randn(batch, 24, 5, 5, dtype=torch.double, requires_grad=True)
    d = torch.randn(batch, 4, dtype=torch.double)
    y, _ = layer.forward_with_repr(x, d)
    att = layer.generator(x.mean(dim=(2, 3)), d)
    expected = naive_dynamic_conv2d(x, layer.weight, att, None, (1, 1), (1, 1), (1, 1), 1)
    assert_same_values_and_gradients(y, expected, (x, layer.weight))


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "shared"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_has_the_inputs_memory_format_as_conv2d(strategy, channels_last):
    """Models ``.view()`` a convolution's output (Keypoint R-CNN's loss): KR layers must return it
    in the layout nn.Conv2d would, whatever layout a strategy computes in."""
    kernel_num = 1 if strategy == "tap_scaled" else 2
    conv = KRConv2d(8, 8, 3, padding=1, kernel_num=kernel_num, strategy=strategy)
    x = torch.randn(3, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, _ = conv.forward_with_repr(x, torch.randn(3, 32))
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert F.conv2d(x, conv.weight[0]).is_contiguous(memory_format=expected)
    assert y.is_contiguous(memory_format=expected)
