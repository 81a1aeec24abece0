"""kr_convert on timm: the poster's backbones (ResNet-18, MobileNetV2 0.5x, ViT-Tiny, PoolFormer-S12).

Needs the ``timm`` extra (``pip install -e ".[timm]"``); skipped without it. Models are built with
random weights (``pretrained=False``): nothing is downloaded.
"""

import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.layers import KRLayer

timm = pytest.importorskip("timm")

# The poster's rows, with what each needs to run on small images (ViT's position embedding is sized
# by img_size).
POSTER_ROWS = {
    "resnet18": {},
    "mobilenetv2_050": {},
    "vit_tiny_patch16_224": {"img_size": 32},
    "poolformer_s12": {},
}
SIZE = 32
NUM_CLASSES = 10


def create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def inner_layers(model: nn.Module, first_layer: str, classifier: str) -> list[str]:
    """Every Conv/Linear of ``model`` but the first layer and the final classifier."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
        and name not in (first_layer, classifier)
    ]


@pytest.mark.parametrize("name", list(POSTER_ROWS))
def test_poster_backbone_converts_and_trains(name):
    static = create(name, **POSTER_ROWS[name])
    model = kr_convert(static, input_size=SIZE)
    report = model.report
    assert report.first_layer is not None and report.classifier is not None
    layers = inner_layers(static, report.first_layer, report.classifier)
    converted = [n for n in layers if isinstance(model.backbone.get_submodule(n), KRLayer)]
    replaced = {d.name for d in report.replaced}
    assert set(converted) <= replaced
    skipped = {d.name: d.reason for d in report.skipped if d.name in layers}
    assert len(converted) >= 0.9 * len(layers), f"{name}: left static: {skipped}"

    model.train()
    logits = model(torch.randn(2, 3, SIZE, SIZE))
    assert logits.shape == (2, NUM_CLASSES)
    F.cross_entropy(logits, torch.randint(0, NUM_CLASSES, (2,))).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: no gradient for {no_grad}"


@pytest.mark.parametrize("name", list(POSTER_ROWS))
def test_kr_model_starts_as_the_static_model(name):
    static = create(name, **POSTER_ROWS[name]).eval()
    model = kr_convert(static, input_size=SIZE).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(POSTER_ROWS))
def test_poster_backbone_at_imagenet_size(name):
    """timm's defaults (ViT at its 224² position embedding), four candidate kernels."""
    static = create(name).eval()
    model = kr_convert(static, kernel_num=4).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=1e-4, atol=1e-4)


def test_timm_macs_recipe_prints_and_writes_figures(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "timm_macs.py"
    main = runpy.run_path(str(recipe), run_name="recipe")["main"]
    out = tmp_path / "macs.json"
    report = main(["--models", "resnet18", "--image-size", "32", "--json", str(out)])
    figures = report["models"]["resnet18"]
    assert figures["kr_4x"]["macs"] > figures["kr_1x"]["macs"] > figures["static"]["macs"] > 0
    assert figures["kr_4x"]["params"] > figures["kr_1x"]["params"] > figures["static"]["params"]
    written = json.loads(out.read_text())
    assert written["timm"] == timm.__version__ and written["image_size"] == 32
    assert "ResNet-18" in capsys.readouterr().out


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_timm_gradient_checkpointing_gives_the_same_gradients(use_reentrant, monkeypatch):
    """timm's own switch, ``model.set_grad_checkpointing()`` (``checkpoint_seq`` over the stages), on
    a converted model: the loss and every gradient as without it, with either checkpoint variant."""
    import copy

    from timm.layers import config as timm_config

    from tests.reference import trained_looking

    monkeypatch.setattr(timm_config, "_USE_REENTRANT_CKPT", use_reentrant)
    model = trained_looking(kr_convert(create("resnet18"), input_size=SIZE))
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 2])

    def loss_and_grads(m: nn.Module):
        m.zero_grad(set_to_none=True)
        images = x.clone().requires_grad_()  # a reentrant checkpoint needs an input with grad
        loss = F.cross_entropy(m(images), y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    checkpointed = copy.deepcopy(model)  # before the first pass: the same count of training passes
    loss, grads = loss_and_grads(model)
    checkpointed.backbone.set_grad_checkpointing(True)
    loss_cp, grads_cp = loss_and_grads(checkpointed)
    torch.testing.assert_close(loss_cp, loss)
    assert grads_cp.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_cp[name], grad, msg=lambda m, n=name: f"{n}: {m}")
