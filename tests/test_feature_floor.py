"""``KRConfig.feature_floor``: the kernel generator's input features are amplified to an across-image
scale of at least the floor, so layers whose inputs barely vary between images can still become
dynamic (``KernelGenerator.amplify_features``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kr import KRConfig, kr_convert
from lightning_kr.diagnostics import kernel_generators
from lightning_kr.layers.kernel_generator import FEATURE_FLOOR, FEATURE_MOMENTUM, KernelGenerator


def rms_std(h: torch.Tensor) -> torch.Tensor:
    """The root mean square over features of the across-batch standard deviation of (B, C)."""
    return h.std(0).square().mean().sqrt()


def test_small_features_are_amplified_to_the_floor_and_large_ones_left_alone():
    torch.manual_seed(0)
    generator = KernelGenerator(16, 8, 9, repr_dim=0)
    generator.amplify_features(0.25)
    assert generator.feature_gain().item() == 1.0  # nothing measured yet: no amplification
    small = torch.randn(32, 16) * 0.01 + 1.0
    generator.train()
    generator(small, None)
    torch.testing.assert_close(generator.feature_scale, rms_std(small))
    torch.testing.assert_close(generator.feature_gain(), 0.25 / rms_std(small))
    torch.testing.assert_close(
        rms_std(generator._amplified(small)), torch.tensor(0.25), rtol=0.1, atol=0
    )

    large = KernelGenerator(16, 8, 9, repr_dim=0)
    large.amplify_features(0.25)
    large.train()
    large(torch.randn(32, 16), None)
    assert large.feature_gain().item() == 1.0


def test_the_running_scale_moves_with_training_batches_only():
    torch.manual_seed(0)
    generator = KernelGenerator(16, 8, 9, repr_dim=0)
    generator.amplify_features(0.25)
    generator.train()
    first, second = torch.randn(8, 16) * 0.01, torch.randn(8, 16) * 0.03
    generator(first, None)
    generator(second, None)
    expected = rms_std(first) * (1 - FEATURE_MOMENTUM) + rms_std(second) * FEATURE_MOMENTUM
    torch.testing.assert_close(generator.feature_scale, expected)
    generator(torch.randn(1, 16), None)  # a batch of one sample has no across-image scale
    generator.eval()
    generator(torch.randn(8, 16), None)
    torch.testing.assert_close(generator.feature_scale, expected)


def test_a_checkpointed_recomputation_reads_the_scale_its_first_pass_wrote():
    torch.manual_seed(0)
    generator = KernelGenerator(16, 8, 9, repr_dim=0)
    generator.amplify_features(0.25)
    generator.randomise_heads({"channel": 1.0})
    generator.train()
    generator(torch.randn(8, 16) * 0.01, None)
    h = (torch.randn(8, 16) * 0.02).requires_grad_()
    out = torch.utils.checkpoint.checkpoint(
        lambda x: generator(x, None).channel, h, use_reentrant=False
    )
    after_forward = generator.feature_scale.clone()
    out.square().sum().backward()
    torch.testing.assert_close(generator.feature_scale, after_forward)
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_the_gain_ramps_in_with_the_push_and_a_recomputation_reads_its_pass():
    torch.manual_seed(0)
    generator = KernelGenerator(16, 8, 9, repr_dim=0)
    generator.amplify_features(0.25)
    generator.warm_up_dynamism(10)
    generator.train()
    small = torch.randn(8, 16) * 0.01
    generator(small, None)  # pass 0: gain 1 whatever the scale
    full = 0.25 / generator.feature_scale
    for _ in range(4):
        generator(small, None)
    assert generator.ramp_step.item() == 5
    torch.testing.assert_close(generator.feature_gain(), 1 + (full - 1) * 0.5)
    seen = []
    original = generator._amplified

    def record(h):
        out = original(h)
        seen.append(out.detach().clone())
        return out

    generator._amplified = record
    h = small.requires_grad_()
    out = torch.utils.checkpoint.checkpoint(
        lambda x: generator(x, None).channel, h, use_reentrant=False
    )
    out.sum().backward()
    assert len(seen) == 2  # the pass and its recomputation in backward
    torch.testing.assert_close(seen[1], seen[0])


def test_the_folded_generator_has_the_gain_in_its_fusion():
    torch.manual_seed(0)
    generator = KernelGenerator(40, 24, 9, kernel_num=4, repr_dim=32)
    generator.amplify_features(0.25)
    generator.randomise_heads({"channel": 1.0, "filter": 1.0, "spatial": 1.0, "kernel": 1.0})
    generator.train()
    for _ in range(3):
        generator(torch.randn(8, 40) * 0.02, torch.randn(8, 32))
    assert generator.feature_gain().item() > 5
    generator.eval()
    h, d = torch.randn(5, 40) * 0.02, torch.randn(5, 32)
    reference = generator(h, d)  # gradient recorded: the generator's own operators
    with torch.no_grad():
        assert generator.folded_for_inference() is not None
        folded = generator(h, d)
    for kind in ("channel", "filter", "spatial", "kernel", "repr_out"):
        torch.testing.assert_close(getattr(folded, kind), getattr(reference, kind).detach())


def spread_after_training(feature_floor: float) -> float:
    """An ODConv-mode layer (no ``d``) whose pooled inputs vary by 1 % between images, trained for
    each image to scale its channels by a target drawn from that image: the across-image spread of
    the trained channel attention (std over images / mean, median over channels)."""
    torch.manual_seed(0)
    directions = torch.randn(16, 16)
    codes = torch.randn(64, 16)
    x = 1.0 + 0.01 * codes @ directions  # (64, 16): 1 % variation between images
    target = 1.0 + 0.4 * torch.tanh(codes[:, :16])  # (64, 16) per-image channel scales
    model = kr_convert(
        nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)),
        mode="odconv",
        feature_floor=feature_floor,
        dynamism_floor=0.0,
        input_size=16,
    )
    generator = next(iter(kernel_generators(model).values()))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(200):
        attentions = generator(x, None).channel
        loss = (attentions - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    generator.eval()
    with torch.no_grad():
        channel = generator(x, None).channel
    return (channel.std(0) / channel.mean(0).abs()).median().item()


@pytest.mark.parametrize("floor", [FEATURE_FLOOR])
def test_a_layer_whose_inputs_barely_vary_becomes_dynamic_only_with_the_floor(floor):
    without = spread_after_training(0.0)
    with_floor = spread_after_training(floor)
    assert without < 0.02, without
    assert with_floor > 10 * without and with_floor > 0.05, (without, with_floor)


def test_only_layers_without_d_amplify_their_features():
    """With ``d`` the fusion varies whatever the scale of ``h`` (``KRConfig.feature_floor``)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    for mode, floors in (("kr", {0.0}), ("odconv", {FEATURE_FLOOR}), ("dyconv", {FEATURE_FLOOR})):
        converted = kr_convert(model, mode=mode, kernel_num=2, input_size=16, inplace=False)
        generators = kernel_generators(converted).values()
        assert generators and {g.feature_floor for g in generators} == floors, mode


def test_records_without_the_option_read_it_as_off():
    assert KRConfig.from_record({}).feature_floor == 0.0
    assert KRConfig().feature_floor == FEATURE_FLOOR
    with pytest.raises(ValueError, match="feature_floor"):
        KRConfig(feature_floor=-1)
