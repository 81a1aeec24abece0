"""``DynamismFloor``: the training-only push that keeps attention logits varying across samples."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from lightning_kr import KRConfig, attention_statistics, kr_convert
from lightning_kr.diagnostics import kernel_generators
from lightning_kr.layers import KRConv2d
from lightning_kr.layers.kernel_generator import DynamismFloor, KernelGenerator


def test_forward_is_the_identity_and_backward_is_the_floor_term_alone():
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * torch.tensor([0.01, 0.1, 0.3, 0.6, 1.0])  # some below the floor
    upstream = torch.randn(8, 5)

    pushed = logits.clone().requires_grad_()
    out = DynamismFloor.apply(pushed, 0.5, 0.05, False)
    torch.testing.assert_close(out, logits)
    out.backward(upstream)  # ignored: the generator adds the push beside the task's gradient

    explicit = logits.clone().requires_grad_()
    std = (explicit - explicit.mean(0)).square().mean(0).add(1e-6).sqrt()
    (0.05 * (0.5 - std).clamp_min(0).sum()).backward()
    torch.testing.assert_close(pushed.grad, explicit.grad)
    # Entries already varying by more than the floor are not pushed.
    assert pushed.grad[:, 4].abs().max() == 0


def test_the_projected_push_loses_only_its_part_that_opposes_the_task():
    """``project``: per column, where the push's gradient and the task's gradient (the gradient
    received) have a negative dot product over the batch, the push loses its component along the
    task's gradient; elsewhere it is the plain push."""
    torch.manual_seed(0)
    logits = torch.randn(8, 4) * 0.1  # every column below the floor
    centred = logits - logits.mean(0)
    plain_push = torch.func.grad(
        lambda z: 0.05 * (0.5 - (z - z.mean(0)).square().mean(0).add(1e-6).sqrt()).sum()
    )(logits)
    # the task's gradient per column: opposing the push, along it, orthogonal to it, zero
    orthogonal = torch.randn(8)
    orthogonal -= orthogonal.mean()
    orthogonal -= (orthogonal @ centred[:, 2]) / centred[:, 2].square().sum() * centred[:, 2]
    task = torch.stack(
        [centred[:, 0] + 0.3 * torch.randn(8), -centred[:, 1], orthogonal, torch.zeros(8)], 1
    )
    pushed = logits.clone().requires_grad_()
    DynamismFloor.apply(pushed, 0.5, 0.05, True).backward(task)
    assert pushed.grad is not None
    # column 0 opposed (pushing apart against a task pulling together): what is left is
    # orthogonal to the task's gradient
    assert plain_push[:, 0] @ task[:, 0] < 0
    assert abs(float(pushed.grad[:, 0] @ task[:, 0])) < 1e-9
    expected = (
        plain_push[:, 0] - (plain_push[:, 0] @ task[:, 0]) / task[:, 0].square().sum() * task[:, 0]
    )
    torch.testing.assert_close(pushed.grad[:, 0], expected)
    # columns 1 (aligned), 2 (orthogonal) and 3 (no task gradient): the plain push
    torch.testing.assert_close(pushed.grad[:, 1:], plain_push[:, 1:])


def test_the_push_reaches_the_generator_and_not_its_inputs():
    """The task's gradient flows to ``h`` (the backbone) and ``d`` (earlier layers) unchanged; the
    push changes the gradient of the generator's own weights only. Forward values are the same."""
    torch.manual_seed(0)
    generator = KernelGenerator(32, 64, 9, kernel_num=4, repr_dim=8).train()
    with torch.no_grad():
        for head in generator.heads.values():
            head.weight.normal_(0, 0.1)
    h = torch.randn(16, 32, requires_grad=True)
    d = torch.randn(16, 8, requires_grad=True)

    def run(floor: float) -> tuple[torch.Tensor, ...]:
        generator.dynamism_floor = floor
        generator.zero_grad(set_to_none=True)
        h.grad = d.grad = None
        generator.norm.reset_running_stats()
        out = generator(h, d)
        assert out.repr_out is not None and out.kernel is not None
        loss = out.channel.sum() + out.filter.square().sum() + out.kernel[:, 0].sum()
        (loss + out.repr_out.sum()).backward()
        statistics = generator.norm.running_mean.clone(), generator.norm.num_batches_tracked.clone()
        return out.channel.detach(), h.grad, d.grad, generator.fuse.weight.grad, *statistics

    pushed, plain = run(0.4), run(0.0)
    assert torch.equal(pushed[0], plain[0])  # forward values
    assert torch.equal(pushed[1], plain[1]) and torch.equal(pushed[2], plain[2])  # h, d
    assert not torch.allclose(pushed[3], plain[3])  # the generator's weights
    assert torch.equal(pushed[4], plain[4]) and pushed[5] == 1  # running statistics updated once


def test_a_layer_pushes_only_in_training_with_more_than_one_sample():
    torch.manual_seed(0)
    layer = KRConv2d(8, 8, 3, padding=1, repr_dim=0)  # ODConv-style: no chain needed
    with torch.no_grad():
        for head in layer.generator.heads.values():
            head.weight.normal_(0, 0.01)  # slightly dynamic, well below the floor
    x = torch.randn(6, 8, 10, 10)

    def head_grads(train: bool, batch: int, floor: float) -> dict[str, torch.Tensor]:
        layer.train(train)
        layer.generator.dynamism_floor = floor
        layer.zero_grad(set_to_none=True)
        layer(x[:batch]).sum().backward()
        return {k: h.weight.grad.clone() for k, h in layer.generator.heads.items()}

    with_push, without = head_grads(True, 6, 0.5), head_grads(True, 6, 0.0)
    assert any(not torch.allclose(with_push[k], without[k]) for k in with_push)
    for args in ((False, 6), (True, 1)):  # eval mode, or a batch of one: nothing to push
        a, b = head_grads(*args, 0.5), head_grads(*args, 0.0)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_kr_convert_sets_the_floor_of_every_generator():
    default = kernel_generators(kr_convert(resnet18(num_classes=4), input_size=32))
    assert {(g.dynamism_floor, g.dynamism_weight) for g in default.values()} == {(0.4, 0.02)}
    assert {g.dynamism_warmup for g in default.values()} == {100}
    off = kr_convert(resnet18(num_classes=4), input_size=32, dynamism_floor=0.0)
    assert {g.dynamism_floor for g in kernel_generators(off).values()} == {0.0}
    with pytest.raises(ValueError, match="dynamism_floor must be a number >= 0"):
        kr_convert(resnet18(num_classes=4), input_size=32, dynamism_floor=-0.1)


def test_the_push_is_projected_by_default_where_a_layer_mixes_several_kernels():
    """``dynamism_projection="auto"`` (default): projected at 4x, not at 1x; True / False for
    every layer; a checkpoint record written before the option existed reads False."""

    def projected(**options: object) -> set[bool]:
        model = kr_convert(resnet18(num_classes=4), input_size=32, **options)
        return {g.dynamism_projection for g in kernel_generators(model).values()}

    assert projected() == {False}
    assert projected(kernel_num=4) == {True}
    assert projected(dynamism_projection=True) == {True}
    assert projected(kernel_num=4, dynamism_projection=False) == {False}
    assert KernelGenerator(8, 8, 9, kernel_num=4).dynamism_projection
    assert not KernelGenerator(8, 8, 9).dynamism_projection
    assert KRConfig.from_record({"kernel_num": 4}).dynamism_projection is False
    with pytest.raises(ValueError, match="dynamism_projection must be True, False or 'auto'"):
        KRConfig(dynamism_projection="yes")


def test_gate_range_bounds_the_gates_and_keeps_the_neutral_slope():
    torch.manual_seed(0)
    layer = KRConv2d(4, 4, 3, padding=1, repr_dim=0)
    generator = layer.generator
    assert generator.gate_range == 0.75  # the default
    logits = torch.linspace(-30, 30, 601).unsqueeze(0)
    assert generator.gate_bounds == (0.25, 1.75)
    generator.gate_range = 1.0
    torch.testing.assert_close(generator._gates(logits), 2 * torch.sigmoid(logits))  # r = 1
    generator.gate_range = 0.5
    gates = generator._gates(logits)
    assert generator.gate_bounds == (0.5, 1.5)
    assert gates.min() >= 0.5 and gates.max() <= 1.5
    zero = torch.zeros(1, 1, requires_grad=True)
    generator._gates(zero).sum().backward()
    assert generator._gates(torch.zeros(1, 1)).item() == 1.0 and zero.grad.item() == 0.5
    with pytest.raises(ValueError, match=r"gate_range must be in \(0, 1\]"):
        kr_convert(resnet18(num_classes=4), input_size=32, gate_range=1.5)


def test_the_floor_makes_a_layer_dynamic_where_the_task_does_not_ask_for_it():
    """A static target, which opposes any variation: without the push the layer stays static; the
    plain push (here with a weight of 0.5, 25 times the default, to win against that loss within a
    few dozen steps) gives different images different kernels. So does the projected push (the
    default): on each batch it loses only its component along the task's gradient, and the rest,
    which does not oppose the task to first order, still makes the layer dynamic."""
    torch.manual_seed(0)
    target = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(256, 8, 12, 12)
    with torch.no_grad():
        y = target(x)

    def trained_spread(floor: float, project: bool = False) -> float:
        torch.manual_seed(1)
        layer = KRConv2d(8, 8, 3, padding=1, repr_dim=0)
        layer.generator.gate_range = 0.5
        layer.generator.dynamism_floor = floor
        layer.generator.dynamism_weight = 0.5
        layer.generator.dynamism_projection = project
        optimiser = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
        for step in range(60):
            batch = slice(step % 8 * 32, step % 8 * 32 + 32)
            loss = torch.nn.functional.mse_loss(layer(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return attention_statistics(layer, x[:64]).median_spread()

    static, pushed = trained_spread(0.0), trained_spread(0.4)
    projected = trained_spread(0.4, project=True)
    assert static < 0.01 and pushed > 0.05, (static, pushed)
    assert 0.05 < projected <= pushed, (projected, pushed)


def test_the_push_warms_up_over_its_training_passes():
    """``dynamism_warmup``: the push's weight is ``min(1, t / passes)`` of its full value at the
    ``t``-th training pass (counted in the saved buffer ``ramp_step``); eval passes do not count."""

    def push_gradient(generator: KernelGenerator) -> torch.Tensor:
        for p in generator.parameters():
            p.grad = None
        attentions = generator(h, d)
        # Only the push: the task's loss is zero.
        (attentions.channel * 0).sum().backward()
        return generator.heads["channel"].weight.grad.clone()

    torch.manual_seed(0)
    h, d = torch.randn(16, 32), torch.randn(16, 8)
    full = KernelGenerator(32, 64, 9, kernel_num=4, repr_dim=8).train()
    full.randomise_heads({"channel": 0.1})  # logits that vary a little: below the floor
    full.dynamism_floor, full.dynamism_warmup = 0.4, 0
    warming = KernelGenerator(32, 64, 9, kernel_num=4, repr_dim=8).train()
    warming.load_state_dict(full.state_dict())
    warming.dynamism_floor = 0.4
    warming.warm_up_dynamism(4)
    reference = push_gradient(full)
    assert reference.abs().max() > 0
    for t in (1, 2):
        torch.testing.assert_close(push_gradient(warming), reference * t / 4)
    warming.eval()(h, d)
    assert warming.ramp_step.item() == 2 and "ramp_step" in warming.state_dict()
    warming.train()
    for t in (3, 4, 5):
        torch.testing.assert_close(push_gradient(warming), reference * min(t, 4) / 4)
    with pytest.raises(ValueError, match="dynamism_warmup must be a whole number"):
        kr_convert(resnet18(num_classes=4), input_size=32, dynamism_warmup=-1)
