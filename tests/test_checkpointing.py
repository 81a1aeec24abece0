"""Activation checkpointing around blocks of a converted model: same loss, same gradients.

Both variants of ``torch.utils.checkpoint``: the non-reentrant one (recomputes saved tensors) and the
reentrant one (runs the block under ``no_grad``; the chain carries the gradient of ``d`` around it,
see ``lightning_kr/layers/reentrant_checkpoint.py``)."""

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


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=cross_entropy):
    torch.manual_seed(1)  # the same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    loss = loss_fn(model(x), y)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if x.requires_grad:
        grads["input"] = x.grad
    return loss.detach(), grads


def assert_same_with_and_without_checkpoint(
    model, blocks, x, y, use_reentrant=False, loss_fn=cross_entropy
):
    wrapped = copy.deepcopy(model)  # before the first pass: the same count of training passes
    loss, grads = loss_and_grads(model, x, y, loss_fn)
    for name in blocks:
        wrap(wrapped.backbone, name, use_reentrant)
    loss_cp, grads_cp = loss_and_grads(wrapped, x, y, loss_fn)
    torch.testing.assert_close(loss_cp, loss)
    renamed = {n.replace(".block.", "."): g for n, g in grads_cp.items()}
    assert renamed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(renamed[name], grad, msg=lambda m, n=name: f"{n}: {m}")
    assert not wrapped.chain.active


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize(
    "blocks",
    [["layer2"], ["layer3.0"], ["layer1.1.conv2"], ["layer1", "layer3.1", "layer4"]],
    ids=["stage", "block-with-downsample", "one-layer", "several"],
)
def test_resnet_blocks(blocks, kernel_num, use_reentrant):
    torch.manual_seed(0)
    model = trained_looking(
        kr_convert(
            torchvision.models.resnet18(num_classes=10), input_size=32, kernel_num=kernel_num
        )
    )
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 7])
    assert_same_with_and_without_checkpoint(model, blocks, x, y, use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_vit_encoder_layers_with_dropout(use_reentrant):
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10, dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip
    model = trained_looking(kr_convert(vit, input_size=16, kernel_num=2))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert_same_with_and_without_checkpoint(
        model,
        ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"],
        x,
        y,
        use_reentrant,
    )


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["odconv", "dyconv"])
def test_ablations_have_no_chain_and_checkpoint_plainly(mode, use_reentrant):
    torch.manual_seed(0)
    model = trained_looking(
        kr_convert(
            torchvision.models.resnet18(num_classes=10), input_size=32, mode=mode, kernel_num=2
        )
    )
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    assert_same_with_and_without_checkpoint(model, ["layer2", "layer3"], x, y, use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_block_holding_the_first_layer_computes_d0_inside(use_reentrant):
    """The stem's d_0 is computed inside the checkpointed block; gradients reach the stem and the
    images (which must require grad: a reentrant checkpoint only differentiates through its
    inputs)."""
    torch.manual_seed(0)
    model = trained_looking(kr_convert(torchvision.models.resnet18(num_classes=10), input_size=32))
    x, y = torch.randn(2, 3, 32, 32, requires_grad=True), torch.tensor([4, 2])
    assert_same_with_and_without_checkpoint(model, ["conv1", "layer2"], x, y, use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_last_block_of_a_model_without_head(use_reentrant):
    """No joint head and no KR layer after the checkpointed block: nothing reads its d_out, and
    the d entering it still gets its gradient (the model's output carries the tie)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    model = trained_looking(kr_convert(net, input_size=16))
    assert model.head is None
    x, y = torch.randn(3, 3, 16, 16), torch.randn(3, 4, 16, 16)
    assert_same_with_and_without_checkpoint(
        model, ["3", "5"], x, y, use_reentrant, loss_fn=nn.functional.mse_loss
    )


def test_backward_after_another_forward_is_a_clear_error():
    model = kr_convert(torchvision.models.resnet18(num_classes=10), input_size=32)
    wrap(model.backbone, "layer2")
    first = model(torch.randn(2, 3, 32, 32)).sum()
    model(torch.randn(3, 3, 32, 32))  # another batch size: the first graph's records are gone
    with pytest.raises(RuntimeError, match="Call backward before the model's next forward"):
        first.backward()
