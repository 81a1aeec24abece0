"""KR models under ``torch.compile``: one graph, no break inside the KR layers, eager's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from lightning_kr import kr_convert
from tests.reference import trained_looking


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new models: start from an empty cache (Dynamo's recompile limit of 8 is
    per code object, across the whole process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_cnn() -> nn.Module:
    """The neighbours real models put around a layer: BatchNorm, in-place ReLU, a strided, a
    depthwise, a 1×1 and a non-square convolution, pooling and a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Conv2d(32, 24, 1),
        nn.Conv2d(24, 24, (1, 3), padding=(0, 1)),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Loss and gradients by parameter name (of the original module when ``model`` is compiled)."""
    params = getattr(model, "_orig_mod", model)
    params.zero_grad(set_to_none=True)
    out = model(x)
    loss = nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in params.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel_num", [4, pytest.param(1, marks=pytest.mark.slow)])
def test_resnet18_train_step_is_one_graph(kernel_num):
    """``torch._dynamo.explain`` on ``kr_convert(resnet18())`` in train mode: no graph break at all."""
    torch.manual_seed(0)
    model = kr_convert(
        torchvision.models.resnet18(num_classes=10), input_size=32, kernel_num=kernel_num
    ).train()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    ("mode", "kernel_num"),
    [
        ("kr", 4),
        pytest.param("kr", 1, marks=pytest.mark.slow),
        ("odconv", 2),
    ],
)
def test_fullgraph_train_steps_match_eager(mode, kernel_num):
    """``fullgraph=True`` compiles; losses and every gradient equal eager's, over repeated calls
    with two batch sizes, in train and in eval mode (the chain's guarantees hold compiled; in the
    ODConv ablation also the running feature scale of ``KRConfig.feature_floor``)."""
    torch.manual_seed(0)
    eager = trained_looking(
        kr_convert(small_cnn(), input_size=16, mode=mode, kernel_num=kernel_num)
    )
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for batch in (4, 4, 3):
        x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
        loss, grads = loss_and_grads(eager, x, y)
        loss_c, grads_c = loss_and_grads(compiled, x, y)
        torch.testing.assert_close(loss_c, loss)
        assert grads_c.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grads_c[name], grad, msg=lambda m, n=name: f"{n}: {m}")
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))
    assert not compiled_model.chain.active  # the run closed, as in eager


@pytest.mark.slow
def test_inductor_train_step_matches_eager():
    """The default backend (inductor, generated C++ on CPU) on the small network."""
    torch.manual_seed(0)
    eager = trained_looking(kr_convert(small_cnn(), input_size=16, kernel_num=4))
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss, grads = loss_and_grads(eager, x, y)
    loss_c, grads_c = loss_and_grads(compiled, x, y)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-4)
