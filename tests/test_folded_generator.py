"""The kernel generator folded for inference computes the generator's attentions in fewer
operators, and is used only where nothing needs more (lightning_kr/layers/folded_generator.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, KernelGenerator

KINDS = ("channel", "filter", "spatial", "kernel", "repr_out")


def trained_generator(**options) -> KernelGenerator:
    """A generator with random heads whose BatchNorm has running statistics, in eval mode."""
    torch.manual_seed(0)
    generator = KernelGenerator(40, options.pop("out_channels", 24), 9, **options)
    generator.randomise_heads({kind: 1.0 for kind in ATTENTION_KINDS})
    generator.train()
    for _ in range(3):
        d = torch.randn(8, generator.repr_dim) if generator.repr_dim else None
        generator(torch.randn(8, 40), d)
    return generator.eval()


def assert_same_attentions(generator: KernelGenerator, h: torch.Tensor, d) -> None:
    reference = generator(h, d)  # grad enabled: the generator's own operators
    with torch.no_grad():
        assert generator.folded_for_inference() is not None
        folded = generator(h, d)
    for kind in KINDS:
        expected, actual = getattr(reference, kind), getattr(folded, kind)
        assert (expected is None) == (actual is None), kind
        if expected is not None:
            torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)


CASES = [  # every norm at 1x and 4x; the other options varied across them
    # kernel_num, norm, gate_scale, repr_dim, summary, depthwise, gate_range
    (1, "batch", 2.0, 32, "pooled", False, 0.75),
    (4, "batch", 2.0, 32, "full", True, 0.75),
    (4, "batch", 1.0, 0, "pooled", False, 0.75),
    (1, "layer", 2.0, 0, "full", True, 1.0),
    (4, "layer", 2.0, 32, "pooled", False, 1.0),
    (1, "none", 1.0, 32, "pooled", True, 0.75),
    (4, "none", 2.0, 0, "pooled", False, 0.5),
]


@pytest.mark.parametrize(
    "kernel_num, norm, gate_scale, repr_dim, summary, depthwise, gate_range", CASES
)
def test_folded_attentions_equal_the_generators(
    kernel_num, norm, gate_scale, repr_dim, summary, depthwise, gate_range
):
    generator = trained_generator(
        out_channels=40 if depthwise else 24,
        kernel_num=kernel_num,
        repr_dim=repr_dim,
        norm=norm,
        gate_scale=gate_scale,
        zero_init=gate_scale == 2.0,
        summary=summary,
        depthwise=depthwise,
    )
    generator.gate_range = gate_range
    generator.temperature.fill_(1.7)
    h = torch.randn(5, 40)
    assert_same_attentions(generator, h, torch.randn(5, repr_dim) if repr_dim else None)
    assert_same_attentions(generator, h[:1], torch.randn(1, repr_dim) if repr_dim else None)


def test_folded_ramp_reads_the_count_reached():
    generator = KernelGenerator(40, 24, 9, kernel_num=4)
    generator.randomise_heads({"spatial": 1.0, "kernel": 1.0})
    generator.ramp_in(10)
    generator.train()
    for _ in range(4):
        generator(torch.randn(8, 40), torch.randn(8, 32))
    assert_same_attentions(generator.eval(), torch.randn(3, 40), torch.randn(3, 32))


def test_folding_is_redone_when_a_weight_or_buffer_changes():
    generator = trained_generator(kernel_num=4)
    h, d = torch.randn(3, 40), torch.randn(3, 32)
    with torch.no_grad():
        first = generator.folded_for_inference()
        assert generator.folded_for_inference() is first  # kept while nothing changes
        generator.heads["spatial"].weight.add_(1.0)  # an optimiser step
        assert_same_attentions(generator, h, d)
        generator.norm.running_mean.add_(0.5)  # a BatchNorm update
        assert_same_attentions(generator, h, d)
        generator.temperature.fill_(3.0)
        assert_same_attentions(generator, h, d)
        generator.gate_range = 0.5  # a plain attribute the fold reads
        assert_same_attentions(generator, h, d)
    generator.load_state_dict(trained_generator(kernel_num=4).state_dict())
    assert_same_attentions(generator, h, d)
    generator.double()
    assert_same_attentions(generator, h.double(), d.double())
    generator.drop_repr_output()  # the last layer of a model without a joint head
    with torch.no_grad():
        assert generator(h.double(), d.double()).repr_out is None
    generator.heads["spatial"] = torch.nn.Linear(generator.hidden, 9).double()  # a replaced head
    assert_same_attentions(generator, h.double(), d.double())


def test_folding_is_used_only_without_gradients_in_eval_mode():
    generator = trained_generator(kernel_num=4)
    assert generator.folded_for_inference() is None  # grad enabled: input gradients need the ops
    with torch.no_grad():
        assert generator.folded_for_inference() is not None
        generator.train()
        assert generator.folded_for_inference() is None  # training: batch statistics
    with torch.inference_mode():
        assert generator.eval().folded_for_inference() is not None
    state = generator.state_dict()
    assert not any("fold" in key for key in state)  # a cache, never saved
