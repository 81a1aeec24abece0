"""``attention_statistics``: how dynamic a model's KR layers are, per layer and attention kind."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from lightning_kr import AttentionStatistics, attention_statistics, kr_convert
from lightning_kr.diagnostics import kernel_generators


def converted(kernel_num: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return kr_convert(resnet18(num_classes=4), input_size=32, kernel_num=kernel_num)


def randomise_heads(model: nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for generator in kernel_generators(model).values():
            for head in generator.heads.values():
                head.weight.normal_(0, std)


def test_a_fresh_conversion_is_static_and_neutral():
    model = converted(kernel_num=4)
    stats = attention_statistics(model, torch.randn(8, 3, 32, 32))
    rows = stats.rows()
    assert {row["kind"] for row in rows} == {"channel", "filter", "spatial", "kernel"}
    assert len(stats.layer_spreads()) == 19  # every KR layer of resnet18, in execution order
    assert next(iter(stats.layer_spreads())) == "layer1.0.conv1"
    for row in rows:
        assert row["samples"] == 8
        assert row["spread"] == pytest.approx(0.0, abs=1e-6)  # every image: the same kernel
        neutral = 0.25 if row["kind"] == "kernel" else 1.0
        assert row["min"] == pytest.approx(neutral) and row["max"] == pytest.approx(neutral)
        assert row["saturated"] == 0.0
        if row["kind"] == "kernel":
            assert row["entropy"] == pytest.approx(1.0)  # uniform over the candidates
        else:
            assert math.isnan(row["entropy"])
    assert stats.median_spread() == pytest.approx(0.0, abs=1e-6)


def test_dynamic_init_makes_every_image_get_its_own_kernel_from_the_start():
    """``dynamic_init=s``: random heads whose logits vary by about 0.7·s across images (a 2·sigmoid
    gate then by about half that, relative to its neutral 1); per kind with a mapping."""
    images = torch.randn(64, 3, 32, 32)
    torch.manual_seed(0)
    model = kr_convert(resnet18(num_classes=4), input_size=32, dynamic_init=0.5)
    by_kind: dict[str, list[float]] = {}
    for row in attention_statistics(model, images, train_mode=True).rows():
        by_kind.setdefault(row["kind"], []).append(row["spread"])
    for kind, spreads in by_kind.items():
        median = sorted(spreads)[len(spreads) // 2]
        assert 0.08 < median < 0.3, (kind, spreads)  # expected ≈ 0.5 · 0.7 · 0.5 = 0.175
    torch.manual_seed(0)
    spatial_only = kr_convert(resnet18(num_classes=4), input_size=32, dynamic_init={"spatial": 1.5})
    for row in attention_statistics(spatial_only, images, train_mode=True).rows():
        if row["kind"] == "spatial":
            assert row["spread"] > 0.15
        else:
            assert row["spread"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(
        ValueError,
        match=r"dynamic_init must be None \(by the weights\), a number >= 0 or a mapping",
    ):
        kr_convert(resnet18(num_classes=4), input_size=32, dynamic_init={"spatia": 1.0})


def test_spread_is_the_across_sample_std_over_the_mean():
    model = converted()
    randomise_heads(model)
    images = torch.randn(12, 3, 32, 32)
    seen = {}
    generator = kernel_generators(model)["layer2.0.conv1"]
    handle = generator.register_forward_hook(lambda m, a, out: seen.update(spatial=out.spatial))
    stats = attention_statistics(model, images)
    handle.remove()
    values = seen["spatial"]
    expected = (values.std(0) / values.abs().mean(0)).mean().item()
    row = next(r for r in stats.rows() if r["layer"] == "layer2.0.conv1" and r["kind"] == "spatial")
    assert row["spread"] == pytest.approx(expected, rel=1e-4)
    assert row["mean"] == pytest.approx(values.mean().item(), rel=1e-5)
    assert stats.median_spread() > 0.02


def test_a_loader_streams_batches_like_one_batch_and_restores_the_mode():
    model = converted()
    randomise_heads(model)
    images = torch.randn(10, 3, 32, 32)
    whole = attention_statistics(model, images)
    loader = DataLoader(TensorDataset(images, torch.zeros(10)), batch_size=3)
    model.train()
    streamed = attention_statistics(model, loader)
    assert model.training
    for a, b in zip(whole.rows(), streamed.rows(), strict=True):
        for key in ("samples", "mean", "min", "max", "spread", "saturated"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    first_two = attention_statistics(model, loader, max_batches=2)
    assert first_two.rows()[0]["samples"] == 6


def test_sums_of_several_processes_merge_to_the_whole():
    model = converted()
    randomise_heads(model)
    images = torch.randn(10, 3, 32, 32)
    whole = attention_statistics(model, images)
    parts = [attention_statistics(model, images[:4]), attention_statistics(model, images[4:])]
    gathered = {key: torch.stack([part.as_tensors()[key] for part in parts]) for key in whole.sums}
    merged = AttentionStatistics.merge_gathered(gathered)
    for a, b in zip(whole.rows(), merged.rows(), strict=True):
        for key in ("samples", "mean", "min", "max", "spread", "saturated"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_saturated_gates_are_counted():
    model = converted()
    with torch.no_grad():
        for generator in kernel_generators(model).values():
            for head in generator.heads.values():
                head.bias.fill_(20.0)  # 2·sigmoid(20) = 2 - 4e-9: every gate at its upper end
    stats = attention_statistics(model, torch.randn(4, 3, 32, 32))
    assert all(row["saturated"] == 1.0 for row in stats.rows())


def test_a_model_without_kr_layers_is_refused():
    with pytest.raises(ValueError, match="kr_convert"):
        attention_statistics(resnet18(), torch.randn(1, 3, 32, 32))
