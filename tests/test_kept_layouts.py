"""Kept layouts: the candidates' rearrangement for ``"taps"`` and ``"candidate_outputs"``, kept
between inference calls and never stale."""

from __future__ import annotations

import gc

import pytest
import torch

from lightning_kr.layers.dynamic_conv import dynamic_conv2d
from lightning_kr.strategies import kept_layouts
from lightning_kr.strategies.kept_layouts import kept_layout


def _conv(x, weight, spatial, kernel, strategy, stride=1, padding=1):
    return dynamic_conv2d(
        x, weight, channel_att=None, filter_att=None, spatial_att=spatial, kernel_att=kernel,
        bias=None, stride=(stride, stride), padding=(padding,) * 4, dilation=(1, 1), groups=1,
        strategy=strategy,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "side", "stride", "kernel_num"),
    [
        ("taps", 6, 1, 1),
        ("taps", 5, 1, 3),
        ("candidate_outputs", 1, 1, 1),  # one live tap of nine
        ("candidate_outputs", 4, 2, 3),
    ],
)
def test_inference_keeps_the_layout_and_follows_every_change_of_the_weight(
    strategy, side, stride, kernel_num
):
    torch.manual_seed(0)
    kept_layouts.clear()
    x = torch.randn(4, 6, side, side)
    weight = torch.nn.Parameter(torch.randn(kernel_num, 5, 6, 3, 3))
    spatial = torch.rand(4, 9) + 0.5
    kernel = torch.softmax(torch.randn(4, kernel_num), 1) if kernel_num > 1 else None

    def expected() -> torch.Tensor:  # one explicit kernel per sample
        with torch.no_grad():
            return _conv(x, weight, spatial, kernel, "reference", stride)

    with torch.inference_mode():
        first = _conv(x, weight, spatial, kernel, strategy, stride)
        (kept,) = [entry[3] for entry in kept_layouts._kept.values()]
        second = _conv(x, weight, spatial, kernel, strategy, stride)
        (reused,) = [entry[3] for entry in kept_layouts._kept.values()]
        assert reused is kept  # kept by the first call, reused by the second
    torch.testing.assert_close(first, expected(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, first)

    # An optimiser step (in place): the next inference call sees the new weight.
    weight.grad = torch.randn_like(weight)
    torch.optim.SGD([weight], lr=0.5).step()
    with torch.no_grad():
        after_step = _conv(x, weight, spatial, kernel, strategy, stride)
    torch.testing.assert_close(after_step, expected(), rtol=1e-4, atol=1e-4)

    # Training (a gradient recorded) computes the layout afresh and keeps nothing new.
    kept_layouts.clear()
    _conv(x, weight, spatial, kernel, strategy, stride).sum().backward()
    assert not kept_layouts._kept


def test_a_kept_layout_goes_with_its_weight():
    kept_layouts.clear()
    weight = torch.randn(2, 3, 4, 3, 3)
    with torch.no_grad():
        kept_layout(weight, "test", lambda w: w.flatten().clone())
        assert len(kept_layouts._kept) == 1
        # another layout of the same weight, and the same layout of another weight, are apart
        kept_layout(weight, "other", lambda w: w.sum())
        kept_layout(weight.clone(), "test", lambda w: w.flatten().clone())
    del weight
    gc.collect()
    assert len(kept_layouts._kept) == 0


def test_a_layout_that_is_a_view_does_not_keep_its_weight_alive():
    """A rearrangement that needs no copy (a view) is kept as a copy: a view would hold its weight
    and so its own entry (a weight made afresh each call, as ``weight.to(bfloat16)`` under
    autocast, would then pile up)."""
    kept_layouts.clear()
    for _ in range(3):
        weight = torch.randn(1, 4, 4, 1, 1)
        with torch.no_grad():
            flat = kept_layout(weight, "view", lambda w: w.view(-1))
        assert flat.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
        del weight, flat
        gc.collect()
    assert len(kept_layouts._kept) == 0
