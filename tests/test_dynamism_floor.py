"""``DynamismFloor``: the training-only push that keeps attention logits varying across samples."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from lightning_kr import kr_convert
from lightning_kr.diagnostics import kernel_generators
from lightning_kr.layers import KRConv2d
from lightning_kr.layers.kernel_generator import DynamismFloor


def test_forward_is_the_identity_and_backward_adds_the_floor_term():
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * torch.tensor([0.01, 0.1, 0.3, 0.6, 1.0])  # some below the floor
    upstream = torch.randn(8, 5)

    pushed = logits.clone().requires_grad_()
    out = DynamismFloor.apply(pushed, 0.5, 0.05)
    torch.testing.assert_close(out, logits)
    out.backward(upstream)

    explicit = logits.clone().requires_grad_()
    std = (explicit - explicit.mean(0)).square().mean(0).add(1e-6).sqrt()
    loss = (explicit * upstream).sum() + 0.05 * (0.5 - std).clamp_min(0).sum()
    loss.backward()
    torch.testing.assert_close(pushed.grad, explicit.grad)
    # Entries already varying by more than the floor get the upstream gradient only.
    torch.testing.assert_close(pushed.grad[:, 4], upstream[:, 4])


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
    assert {(g.dynamism_floor, g.dynamism_weight) for g in default.values()} == {(0.0, 0.05)}
    pushed = kr_convert(resnet18(num_classes=4), input_size=32, dynamism_floor=0.4)
    assert {g.dynamism_floor for g in kernel_generators(pushed).values()} == {0.4}
    with pytest.raises(ValueError, match="dynamism_floor must be a number >= 0"):
        kr_convert(resnet18(num_classes=4), input_size=32, dynamism_floor=-0.1)
