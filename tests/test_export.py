"""ONNX export: one file, any batch, the same numbers as eager PyTorch (onnxruntime, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.export import onnx_batch_is_free, to_onnx
from tests.reference import trained_looking

BATCHES = (1, 3, 8)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(24, 24, (1, 3), padding=(0, 1)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


def depthwise_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 32, 1),  # pointwise
        nn.ReLU6(inplace=True),
        nn.Conv2d(32, 32, 5, padding=2, groups=8),  # grouped
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip


def small_video_cnn() -> nn.Module:
    """Conv3d layers (KRConv3d): stride in space only, a depthwise layer, a (1, 3, 3) kernel."""
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv3d(8, 8, 3, stride=(1, 2, 2), padding=1, groups=8),
        nn.Conv3d(8, 12, (1, 3, 3), padding=(0, 1, 1)),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )


def trained_looking_with_statistics(model: nn.Module) -> nn.Module:
    return trained_looking(model, 0.3, batchnorm_statistics=True)


def assert_onnx_matches_eager(
    model: nn.Module, path, size: int = 16, frames: int | None = None
) -> None:
    """One exported file at batch 1, 3 and 8 against eager; ``frames``: a video model."""
    sample = (3, size, size) if frames is None else (3, frames, size, size)
    to_onnx(model, path, torch.randn(2, *sample))
    assert onnx_batch_is_free(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    for batch in BATCHES:
        x = torch.randn(batch, *sample)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("mode", "kernel_num"),
    [("kr", 1), ("kr", 4), ("odconv", 1), ("odconv", 4), ("dyconv", 1), ("dyconv", 4)],
)
def test_small_cnn_exports_with_a_free_batch_in_every_mode(tmp_path, mode, kernel_num):
    model = trained_looking_with_statistics(
        kr_convert(small_cnn(), input_size=16, mode=mode, kernel_num=kernel_num)
    )
    assert_onnx_matches_eager(model, tmp_path / "cnn.onnx")


@pytest.mark.parametrize("kernel_num", [1, 4])
def test_depthwise_network_exports_with_a_free_batch(tmp_path, kernel_num):
    model = trained_looking_with_statistics(
        kr_convert(depthwise_net(), input_size=16, kernel_num=kernel_num)
    )
    assert_onnx_matches_eager(model, tmp_path / "depthwise.onnx")


# One case of each family in CI (the suite's 10-minute budget); the others with -m slow.
@pytest.mark.parametrize("kernel_num", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_small_video_network_exports_with_a_free_batch(tmp_path, kernel_num):
    """KRConv3d's grouped convolution would bake the batch into ``groups``: under export it runs
    tap by tap (the 3-D ``"tap_products"`` strategy)."""
    model = trained_looking_with_statistics(
        kr_convert(
            small_video_cnn(), example_input=torch.randn(2, 3, 4, 8, 8), kernel_num=kernel_num
        )
    )
    assert_onnx_matches_eager(model, tmp_path / "video.onnx", size=8, frames=4)


@pytest.mark.parametrize("version", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_small_swin_exports_with_a_free_batch(tmp_path, version):
    """KR shifted-window attention (v2: its position-bias MLP is KR too)."""
    swin = torchvision.models.swin_transformer
    blocks = {} if version == 1 else {
        "block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2,
    }  # fmt: skip
    model = swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
        num_classes=10, **blocks,
    )  # fmt: skip
    model = trained_looking_with_statistics(kr_convert(model, input_size=32))
    assert_onnx_matches_eager(model, tmp_path / "swin.onnx", size=32)


def test_model_without_head_exports_with_a_free_batch(tmp_path):
    """A dense-prediction network (no class logits, so no joint head): the output is a map."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    model = trained_looking_with_statistics(kr_convert(net, input_size=16, kernel_num=4))
    assert model.head is None
    assert_onnx_matches_eager(model, tmp_path / "dense.onnx")


@pytest.mark.parametrize("kernel_num", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_small_vit_exports_with_a_free_batch(tmp_path, kernel_num):
    model = trained_looking_with_statistics(
        kr_convert(small_vit(), input_size=16, kernel_num=kernel_num)
    )
    assert_onnx_matches_eager(model, tmp_path / "vit.onnx")


def test_export_keeps_the_training_mode_and_accepts_a_batch_of_one(tmp_path):
    model = kr_convert(small_cnn(), input_size=16).train()
    path = to_onnx(model, tmp_path / "sub" / "one.onnx", torch.randn(1, 3, 16, 16))
    assert path.exists() and model.training
    assert onnx_batch_is_free(path)


def test_fixed_batch_export_is_fixed(tmp_path):
    path = to_onnx(
        kr_convert(small_cnn(), input_size=16), tmp_path / "fixed.onnx", torch.randn(4, 3, 16, 16),
        dynamic_batch=False,
    )  # fmt: skip
    assert not onnx_batch_is_free(path)


def test_bad_example_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="one input tensor"):
        to_onnx(kr_convert(small_cnn(), input_size=16), tmp_path / "x.onnx", [1, 2, 3])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("builder", "size"), [(torchvision.models.resnet18, 64), (torchvision.models.vit_b_16, 224)]
)
@pytest.mark.parametrize("kernel_num", [1, 4])
def test_torchvision_models_export_with_a_free_batch(tmp_path, builder, size, kernel_num):
    kwargs = {"image_size": size} if builder is torchvision.models.vit_b_16 else {}
    model = trained_looking_with_statistics(
        kr_convert(builder(num_classes=10, **kwargs), input_size=size, kernel_num=kernel_num)
    )
    assert_onnx_matches_eager(model, tmp_path / "model.onnx", size=size)


@pytest.mark.slow
def test_export_benchmark_recipe_prints_and_writes_rows(tmp_path, monkeypatch):
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    monkeypatch.syspath_prepend(str(recipes))
    import export_benchmark

    out = tmp_path / "export.json"
    rows = export_benchmark.main(
        ["--image-size", "16", "--batches", "1", "3", "--repeats", "1", "--warmup", "0",
         "--configs", "static", "kr_1x", "--json", str(out)]
    )  # fmt: skip
    assert [(r["config"], r["batch"]) for r in rows] == [
        ("static", 1), ("static", 3), ("kr_1x", 1), ("kr_1x", 3)
    ]  # fmt: skip
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
