"""``tap_columns`` (lightning_kr/strategies/candidate_outputs.py): the im2col columns of some taps
as strided slices, equal to ``F.unfold``'s columns of those taps."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lightning_kr.strategies.candidate_outputs import tap_columns
from lightning_kr.strategies.geometry import live_taps


def random_geometries(count: int, seed: int = 0):
    """Kernels 1–4 (non-square), strides 1–3, dilations 1–2, paddings 0–3, maps 1–9."""
    rng = random.Random(seed)
    found = []
    while len(found) < count:
        kh, kw = rng.randint(1, 4), rng.randint(1, 4)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        dh, dw = rng.randint(1, 2), rng.randint(1, 2)
        ph, pw = rng.randint(0, 3), rng.randint(0, 3)
        height, width = rng.randint(1, 9), rng.randint(1, 9)
        oh = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh >= 1 and ow >= 1:
            found.append(((kh, kw), (sh, sw), (ph, pw), (dh, dw), (height, width), (oh, ow)))
    return found


@pytest.mark.parametrize("geometry", random_geometries(60))
def test_tap_columns_equal_unfold_columns(geometry):
    kernel, stride, padding, dilation, size, out = geometry
    x = torch.randn(2, 3, *size)
    unfolded = F.unfold(x, kernel, dilation, padding, stride).view(2, 3, -1, out[0] * out[1])
    every = list(range(kernel[0] * kernel[1]))
    live = live_taps(kernel, stride, padding, dilation, size, out)
    for taps in (every, live, every[::2]):
        columns = tap_columns(x, kernel, stride, padding, dilation, out, taps)
        assert columns.shape == (2, 3, len(taps), out[0] * out[1])
        torch.testing.assert_close(columns, unfolded[:, :, taps], rtol=0, atol=0)


def test_tap_columns_of_no_tap_is_empty():
    x = torch.randn(2, 3, 1, 1)
    assert tap_columns(x, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), []).shape == (2, 3, 0, 1)
