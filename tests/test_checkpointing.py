"""Activation checkpointing around blocks of a converted model: same loss, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_kr import kr_convert
from tests.reference import trained_looking


class Checkpointed(nn.Module):
    """``block`` run through ``torch.utils.checkpoint`` (how users wrap a block by hand)."""

    def __init__(self, block: nn.Module, use_reentrant: bool = False) -> None:
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def wrap(model: nn.Module, name: str, use_reentrant: bool = False) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, Checkpointed(parent.get_submodule(child), use_reentrant))
    return model


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(1)  # the same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_with_and_without_checkpoint(model, blocks, x, y):
    loss, grads = loss_and_grads(model, x, y)
    wrapped = copy.deepcopy(model)
    for name in blocks:
        wrap(wrapped.backbone, name)
    loss_cp, grads_cp = loss_and_grads(wrapped, x, y)
    torch.testing.assert_close(loss_cp, loss)
    renamed = {n.replace(".block.", "."): g for n, g in grads_cp.items()}
    assert renamed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(renamed[name], grad, msg=lambda m, n=name: f"{n}: {m}")
    assert not wrapped.chain.active


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize(
    "blocks",
    [["layer2"], ["layer3.0"], ["layer1.1.conv2"], ["layer1", "layer3.1", "layer4"]],
    ids=["stage", "block-with-downsample", "one-layer", "several"],
)
def test_resnet_blocks(blocks, kernel_num):
    torch.manual_seed(0)
    model = trained_looking(
        kr_convert(
            torchvision.models.resnet18(num_classes=10), input_size=32, kernel_num=kernel_num
        )
    )
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 7])
    assert_same_with_and_without_checkpoint(model, blocks, x, y)


def test_vit_encoder_layers_with_dropout():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10, dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip
    model = trained_looking(kr_convert(vit, input_size=16, kernel_num=2))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert_same_with_and_without_checkpoint(
        model, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"], x, y
    )


@pytest.mark.parametrize("mode", ["odconv", "dyconv"])
def test_ablations_have_no_chain_and_checkpoint_plainly(mode):
    torch.manual_seed(0)
    model = trained_looking(
        kr_convert(
            torchvision.models.resnet18(num_classes=10), input_size=32, mode=mode, kernel_num=2
        )
    )
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    assert_same_with_and_without_checkpoint(model, ["layer2", "layer3"], x, y)


def test_reentrant_checkpoint_is_refused_with_the_fix():
    model = kr_convert(torchvision.models.resnet18(num_classes=10), input_size=32)
    wrap(model.backbone, "layer2", use_reentrant=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(x).sum().backward()


def test_backward_after_another_forward_is_a_clear_error():
    model = kr_convert(torchvision.models.resnet18(num_classes=10), input_size=32)
    wrap(model.backbone, "layer2")
    first = model(torch.randn(2, 3, 32, 32)).sum()
    model(torch.randn(3, 3, 32, 32))  # another batch size: the first graph's records are gone
    with pytest.raises(RuntimeError, match="Call backward before the model's next forward"):
        first.backward()
