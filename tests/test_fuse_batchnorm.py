"""BatchNorm folding: the folded model computes the unfolded one's function, and only what is safe is
folded."""

from __future__ import annotations

import copy
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from lightning_kr import KRConv2d, fuse_batchnorm, kr_convert
from lightning_kr.export import onnx_batch_is_free, to_onnx
from tests.reference import trained_looking

SIZE = 32


def grouped_net() -> nn.Module:
    """Dense, grouped, depthwise and biased convolutions, each followed by a BatchNorm, and a
    residual block."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False),  # grouped
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),  # depthwise
        nn.BatchNorm2d(32),
        nn.ReLU6(),
        nn.Conv2d(32, 48, 1),  # with a bias
        nn.BatchNorm2d(48),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(48, 10),
    )


BUILDERS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "grouped": grouped_net,
}


def with_statistics(model: nn.Module, attention_scale: float) -> nn.Module:
    """``model`` in eval mode with its attentions off their neutral start and BatchNorms that do
    something: γ in [0.5, 1.5], β and the running mean in [-0.1, 0.1], the variance in [1, 2]."""
    trained_looking(model, attention_scale)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(1.0, 2.0)
    return model.eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def backbone_batchnorms(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and ".generator." not in name
    ]


@pytest.mark.parametrize(
    ("arch", "kernel_num", "dtype"),
    [
        ("grouped", 1, torch.float32),
        ("grouped", 4, torch.float32),
        ("grouped", 4, torch.float64),
        ("resnet18", 4, torch.float32),
        pytest.param("mobilenet_v2", 1, torch.float32, marks=pytest.mark.slow),
        pytest.param("mobilenet_v2", 4, torch.float32, marks=pytest.mark.slow),
        pytest.param("resnet18", 1, torch.float32, marks=pytest.mark.slow),
        pytest.param("mobilenet_v2", 4, torch.float64, marks=pytest.mark.slow),
        pytest.param("resnet18", 4, torch.float64, marks=pytest.mark.slow),
    ],
)
def test_folded_model_computes_the_same(arch, kernel_num, dtype):
    """Every backbone BatchNorm follows a convolution and is folded; the outputs agree to 1e-5
    relative in float32, and to 1e-7 in float64 with strongly varying attentions (with those,
    float32 rounding alone moves a deep KR network's output by 1e-3)."""
    attention_scale, tolerance = (0.1, 1e-5) if dtype == torch.float32 else (0.3, 1e-7)
    model = kr_convert(BUILDERS[arch](), input_size=SIZE, kernel_num=kernel_num)
    unfolded = with_statistics(model, attention_scale).to(dtype)
    folded = fuse_batchnorm(copy.deepcopy(unfolded))
    report = folded.fusion_report
    assert [d.name for d in report.folded] == backbone_batchnorms(unfolded), str(report)
    assert not report.skipped and not backbone_batchnorms(folded)
    for batch in (1, 8):
        x = torch.randn(batch, 3, SIZE, SIZE, dtype=dtype)
        with torch.no_grad():
            expected, got = unfolded(x), folded(x)
        assert relative_error(got, expected) <= tolerance, batch


def test_static_first_layer_is_folded_too():
    model = with_statistics(kr_convert(grouped_net(), input_size=SIZE, kernel_num=4), 0.1)
    report = fuse_batchnorm(model).fusion_report
    into = {d.name: d.reason for d in report.folded}
    assert into["backbone.1"].startswith("static Conv2d")
    assert into["backbone.4"].startswith("KRConv2d: scale into its 4 candidates")
    assert isinstance(model.backbone[1], nn.Identity)
    assert model.backbone[9].bias is not None  # a bias was created


def test_training_mode_is_refused():
    model = kr_convert(grouped_net(), input_size=SIZE)
    with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\)"):
        fuse_batchnorm(model.train())
    model.eval()
    model.backbone[1].train()
    with pytest.raises(ValueError, match=r"BatchNorm 'backbone\.1' is in training mode"):
        fuse_batchnorm(model)


class Unsafe(nn.Module):
    """BatchNorms that must not be folded, and one that may."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.after_relu = nn.BatchNorm2d(8)  # conv → relu → bn
        self.kr = KRConv2d(8, 8, 3, padding=1, kernel_num=4, repr_dim=0)
        self.after_kr_used_twice = nn.BatchNorm2d(8)  # the conv's output is also the residual
        self.kr2 = KRConv2d(8, 8, 3, padding=1, kernel_num=4, repr_dim=0)
        self.batch_statistics = nn.BatchNorm2d(8, track_running_stats=False)
        self.kr3 = KRConv2d(8, 8, 3, padding=1, kernel_num=4, repr_dim=0)
        self.shared = nn.BatchNorm2d(8)  # called twice
        self.kr4 = KRConv2d(8, 8, 1, kernel_num=4, repr_dim=0)
        self.safe = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.after_relu(torch.relu(self.stem(x)))
        y = self.kr(x)
        x = self.after_kr_used_twice(y) + y
        x = self.batch_statistics(self.kr2(x))
        x = self.shared(self.shared(self.kr3(x)))
        return self.safe(self.kr4(x))


def test_batchnorm_not_directly_after_a_convolution_is_left_alone():
    model = with_statistics(Unsafe(), 0.3)
    expected_skips = {
        "after_relu": "its input is not a module's output",
        "after_kr_used_twice": "the output of kr is also used elsewhere",
        "batch_statistics": "no running statistics",
        "shared": "is called more than once",
    }
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        report = fuse_batchnorm(model).fusion_report
        got = model(x)
    assert [d.name for d in report.folded] == ["safe"]
    assert isinstance(model.safe, nn.Identity)
    skipped = {d.name: d.reason for d in report.skipped}
    assert skipped.keys() == expected_skips.keys()
    for name, reason in expected_skips.items():
        assert reason in skipped[name]
        assert isinstance(getattr(model, name), nn.BatchNorm2d)
    assert relative_error(got, expected) <= 1e-5
    assert "folded" in str(report) and "skipped" in str(report)


class Branching(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it, its children are traced."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.other = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.other(y) if y.sum() > 0 else y


def test_untraceable_model_is_folded_block_by_block():
    model = with_statistics(Branching(), 0.0)
    report = fuse_batchnorm(model).fusion_report
    assert [d.name for d in report.folded] == ["block.1"]
    assert [d.name for d in report.skipped] == ["other"]
    assert "torch.fx could not trace it" in report.notes[0]


def test_folded_model_exports_with_a_free_batch(tmp_path):
    model = with_statistics(kr_convert(grouped_net(), input_size=16, kernel_num=4), 0.1)
    folded = fuse_batchnorm(copy.deepcopy(model))
    path = to_onnx(folded, tmp_path / "folded.onnx", torch.randn(2, 3, 16, 16))
    assert onnx_batch_is_free(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_benchmark_recipe_times_the_folded_model(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "recipes"))
    import export_benchmark

    rows = export_benchmark.main(
        ["--arch", "resnet18", "--image-size", "16", "--batches", "2", "--repeats", "1",
         "--warmup", "0", "--configs", "kr_4x", "--fuse-batchnorm", "--eager-only"]
    )  # fmt: skip
    assert [r["config"] for r in rows] == ["kr_4x", "kr_4x+fused"]
    assert rows[1]["onnxruntime_ms"] is None and rows[1]["max_abs_diff"] < 1e-3
