"""How the attention heads start is decided by the weights (``lightning_kr.conversion.weights``).

``kr_convert(model)`` with ``dynamic_init`` / ``dynamic_warmup`` left at None: fresh weights (every
normalisation layer as constructed) get zero heads; trained weights (BatchNorm running statistics,
LayerNorm / GroupNorm weights that vary) get random heads ramped in over 36 training passes from the
static function; a model without a normalisation layer cannot tell, gets zero heads, and its report
says how to ask for the other start.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer, resnet18

from lightning_kr import KRConfig, KRModel, attention_statistics, kr_convert
from lightning_kr.conversion.weights import weights_are_trained
from lightning_kr.diagnostics import kernel_generators


def trained_resnet() -> nn.Module:
    """resnet18 after one training-mode pass: its BatchNorms hold running statistics."""
    torch.manual_seed(0)
    model = resnet18(num_classes=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


def test_fresh_and_trained_batchnorms_are_told_apart():
    assert weights_are_trained(resnet18(num_classes=4)) is False
    assert weights_are_trained(trained_resnet()) is True
    loaded = resnet18(num_classes=4)  # weights loaded from a file carry their statistics
    loaded.load_state_dict(trained_resnet().state_dict())
    assert weights_are_trained(loaded) is True
    old_format = resnet18(num_classes=4)  # statistics without a batch count (older files)
    state = {k: v for k, v in trained_resnet().state_dict().items() if "num_batches" not in k}
    old_format.load_state_dict(state, strict=False)
    assert weights_are_trained(old_format) is True
    no_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    assert weights_are_trained(no_norm) is None
    untracked = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    assert weights_are_trained(untracked) is None


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), nn.GroupNorm(2, 8)])
def test_layer_and_group_norms_tell_too(norm):
    """Transformers have no BatchNorm: their norms' weights are one constant until trained (1, or
    0 where a model zero-initialises a post-norm, as timm's SwinV2)."""
    model = nn.Sequential(nn.Linear(8, 8), norm)
    assert weights_are_trained(model) is False
    with torch.no_grad():
        norm.weight.zero_()
    assert weights_are_trained(model) is False
    with torch.no_grad():
        norm.weight[0] = 0.5
    assert weights_are_trained(model) is True
    fresh_vit = VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    assert weights_are_trained(fresh_vit) is False


def test_fresh_weights_start_with_zero_heads():
    model = kr_convert(resnet18(num_classes=4), input_size=32)
    assert (model.config.dynamic_init, model.config.dynamic_warmup) == (0.0, 0)
    assert not any("dynamic_init" in note for note in model.report.notes)
    heads = [h.weight for g in kernel_generators(model).values() for h in g.heads.values()]
    assert all(bool((w == 0).all()) for w in heads)


def test_trained_weights_start_random_from_the_static_function_and_become_dynamic():
    static = trained_resnet()
    model = kr_convert(copy.deepcopy(static), input_size=32)
    assert (model.config.dynamic_init, model.config.dynamic_warmup) == (0.5, 36)
    assert any("trained weights" in note for note in model.report.notes)
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), static(images), rtol=1e-4, atol=1e-5)
    assert attention_statistics(model, images).median_spread() == pytest.approx(0.0, abs=1e-6)
    model.train()
    with torch.no_grad():
        for _ in range(36):  # the ramp: 36 training passes
            model(images)
    assert attention_statistics(model, images).median_spread() > 0.1


def test_options_set_by_the_user_are_kept():
    static = trained_resnet()
    zero = kr_convert(copy.deepcopy(static), input_size=32, dynamic_init=0)
    assert (zero.config.dynamic_init, zero.config.dynamic_warmup) == (0, 0)
    assert not any("dynamic_init" in note for note in zero.report.notes)
    fresh = kr_convert(resnet18(num_classes=4), input_size=32, dynamic_init=0.3, dynamic_warmup=5)
    assert (fresh.config.dynamic_init, fresh.config.dynamic_warmup) == (0.3, 5)
    assert KRConfig().for_weights(True).dynamic_warmup == 36
    assert KRConfig(dynamic_warmup=10).for_weights(True).dynamic_init == 0.0


def test_a_model_without_normalisation_says_how_to_start_random_heads():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    converted = kr_convert(model, input_size=16)
    assert converted.config.dynamic_init == 0.0
    assert any("dynamic_init=0.5, dynamic_warmup=36" in n for n in converted.report.notes)


def test_the_decided_start_is_saved_and_a_rebuild_must_match_it(tmp_path):
    model = kr_convert(trained_resnet(), input_size=32)
    model.save_pretrained(tmp_path / "finetuned")
    loaded = KRModel.from_pretrained(tmp_path / "finetuned", base_model=resnet18(num_classes=4))
    assert (loaded.config.dynamic_init, loaded.config.dynamic_warmup) == (0.5, 36)
    # A fresh architecture converts with zero heads and no ramp: loading says what to pass.
    rebuilt = kr_convert(resnet18(num_classes=4), input_size=32)
    with pytest.raises(RuntimeError, match=r"dynamic_warmup: checkpoint=36, this model=0"):
        rebuilt.load_state_dict(model.state_dict())
    kr_convert(resnet18(num_classes=4), input_size=32, dynamic_warmup=36).load_state_dict(
        model.state_dict()
    )


def test_a_trained_transformer_starts_random_from_its_own_function():
    torch.manual_seed(0)
    vit = VisionTransformer(
        32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    assert kr_convert(copy.deepcopy(vit), input_size=32).config.dynamic_warmup == 0
    with torch.no_grad():  # as training leaves them
        for norm in (m for m in vit.modules() if isinstance(m, nn.LayerNorm)):
            norm.weight.add_(0.1 * torch.randn_like(norm.weight))
    model = kr_convert(copy.deepcopy(vit), input_size=32)
    assert (model.config.dynamic_init, model.config.dynamic_warmup) == (0.5, 36)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), vit.eval()(images), rtol=1e-4, atol=1e-5)
