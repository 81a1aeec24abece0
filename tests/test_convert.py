import copy
import io

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, squeezenet1_1, vit_b_16

from lightning_kr import KRModel, kr_convert
from lightning_kr.layers import KRConv1d, KRConv2d, KRLayer, KRLinear, KRMultiheadAttention


def small_resnet(**kwargs):
    return kr_convert(resnet18(num_classes=10), input_size=32, **kwargs)


def test_resnet18_conversion_and_report():
    static = resnet18(num_classes=10)
    model = kr_convert(static, input_size=32)
    assert isinstance(model, KRModel)
    replaced = {d.name for d in model.report.replaced}
    skipped = {d.name: d.reason for d in model.report.skipped}
    assert len(replaced) == 19 and "layer2.0.downsample.0" in replaced
    assert "first layer" in skipped["conv1"] and "final classifier" in skipped["fc"]
    assert model.report.first_layer == "conv1" and model.report.classifier == "fc"
    assert isinstance(model.backbone.layer1[0].conv1, KRConv2d)
    assert isinstance(static.layer1[0].conv1, nn.Conv2d), "a copy is converted by default"
    assert model.report.params_after > model.report.params_before
    text = str(model.report)
    assert "layer4.1.conv2" in text and "replaced" in text
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_inplace_conversion():
    static = resnet18(num_classes=10)
    model = kr_convert(static, input_size=32, inplace=True)
    assert model.backbone is static and isinstance(static.layer1[0].conv1, KRConv2d)


def test_downsample_receives_conv2s_d_in_execution_order():
    model = small_resnet().eval()
    seen = []
    for name, layer in model.kr_layers():
        layer.register_forward_pre_hook(lambda m, a, n=name: seen.append(n))
    model(torch.randn(1, 3, 32, 32))
    i = seen.index("layer2.0.conv2")
    assert seen[i + 1] == "layer2.0.downsample.0"


@pytest.mark.parametrize("builder", [resnet18, mobilenet_v2])
def test_preserve_function(builder):
    static = builder(num_classes=10).eval()
    model = kr_convert(static, kernel_num=4, preserve_function=True, input_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - static(x)).abs().max() < 1e-4


def test_preserve_function_vit_b_16_with_attention_converted():
    static = vit_b_16().eval()
    model = kr_convert(static, preserve_function=True).eval()
    attention = model.backbone.encoder.layers[0].self_attention
    assert isinstance(attention, KRMultiheadAttention)
    assert isinstance(model.backbone.encoder.layers[0].mlp[0], KRLinear)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - static(x)).abs().max() < 1e-4


def sgd_step(model: nn.Module) -> nn.Module:
    """One SGD step: the zero-initialised read-outs (attention heads, KR head) leave zero, so ``d``
    and the attentions start to depend on the input (at initialisation the model is the static one)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model.train()(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model


def test_gradients_reach_stem_head_and_kernel_generators():
    model = sgd_step(small_resnet(kernel_num=4))
    out = model(torch.randn(3, 3, 32, 32))
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert model.stem.proj.weight.grad.abs().sum() > 0
    assert model.head.kr_head.weight.grad.abs().sum() > 0
    generator = model.backbone.layer3[0].conv1.generator
    assert generator.fuse.weight.grad.abs().sum() > 0
    assert generator.represent[0].weight.grad.abs().sum() > 0


def test_d_changes_the_output():
    model = sgd_step(small_resnet()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        model.stem.proj.bias.add_(1.0)
        assert not torch.allclose(model(x), base)


def test_repeated_calls_no_grad_eval_batch_one():
    model = small_resnet().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    assert not model.chain.active, "the chain is closed after each call"
    model.train()  # batch size 1 trains (64x64 so the static BatchNorm sees more than one value)
    out = model(torch.randn(1, 3, 64, 64))
    out.sum().backward()
    assert torch.isfinite(model.backbone.layer4[1].conv2.weight.grad).all()


def test_batch_is_independent_per_sample():
    model = small_resnet(kernel_num=4).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_other_image_sizes_work():
    model = small_resnet()
    assert model(torch.randn(2, 3, 48, 40)).shape == (2, 10)


def test_inplace_relu_after_kr_layers_trains_at_imagenet_size():
    """squeezenet1_1 puts ReLU(inplace=True) after every convolution; at 224×224 its first layers
    run the folded strategy, whose output the ReLU modifies in place."""
    model = kr_convert(squeezenet1_1(num_classes=10), input_size=224)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    assert all(layer.weight.grad is not None for _, layer in model.kr_layers())


def test_ablation_modes():
    odconv = small_resnet(mode="odconv")
    assert odconv.stem is None and odconv.head is None
    assert not odconv.backbone.layer1[0].conv1.uses_repr
    dy = small_resnet(mode="dyconv", kernel_num=4)
    assert set(dy.backbone.layer1[0].conv1.generator.heads) == {"kernel"}
    for m in (odconv, dy):
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_include_exclude_filter():
    by_regex = small_resnet(include=r"layer4\..*")
    assert {d.name for d in by_regex.report.replaced} == {
        n
        for n, m in resnet18().named_modules()
        if n.startswith("layer4.") and isinstance(m, nn.Conv2d)
    }
    by_suffix = small_resnet(include=["conv1", "conv2"], exclude=["layer1.0.conv1"])
    names = {d.name for d in by_suffix.report.replaced}
    assert "layer1.0.conv2" in names and "layer1.0.conv1" not in names
    assert not any("downsample" in n for n in names)
    by_fn = small_resnet(filter_fn=lambda name, m: m.in_channels >= 256)
    assert all(
        name.startswith(("layer3", "layer4")) for name in (d.name for d in by_fn.report.replaced)
    )
    with pytest.raises(ValueError, match="matched no layer"):
        small_resnet(include=["nothing_here"])
    with pytest.raises(ValueError, match="matched no layer"):
        small_resnet(include=["fc"])  # the classifier stays static: nothing left to convert


class WithConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.temporal = nn.Conv1d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.up(self.body(self.stem(x)))
        b, c, h, w = x.shape
        x = self.temporal(x.flatten(2)).view(b, c, h, w)
        return self.fc(x.mean((2, 3)))


def test_unsupported_layers_are_skipped_and_listed():
    model = kr_convert(WithConv1d(), input_size=16)
    skipped = {d.name: d.reason for d in model.report.skipped}
    assert "transposed convolutions stay static" in skipped["up"]
    assert [d.name for d in model.report.replaced] == ["body", "temporal"]
    assert isinstance(model.backbone.temporal, KRConv1d)
    with pytest.raises(ValueError, match="cannot convert 'up'"):
        kr_convert(WithConv1d(), input_size=16, include=["up", "body"])


def test_state_dict_round_trip_and_option_mismatch():
    model = small_resnet(kernel_num=4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = small_resnet(kernel_num=4)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    torch.testing.assert_close(model(x), fresh(x))
    with pytest.raises(RuntimeError, match="kernel_num: checkpoint=4, this model=1"):
        small_resnet(kernel_num=1).load_state_dict(state)
    with pytest.raises(RuntimeError, match="other layers converted"):
        small_resnet(kernel_num=4, exclude=["downsample.0"]).load_state_dict(state)


def test_runtime_only_options_do_not_block_loading():
    """``strategy`` and ``init_noise`` change neither the architecture nor the trained function."""
    state = small_resnet(kernel_num=4).state_dict()
    other = small_resnet(kernel_num=4, strategy="unfold", init_noise=0.0)
    other.load_state_dict(state)
    assert other.config.strategy == "unfold"  # the loading model keeps its own
    reference = small_resnet(kernel_num=4)
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    other.eval(), reference.eval()
    torch.testing.assert_close(other(x), reference(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="repr_dim: checkpoint=32, this model=16"):
        small_resnet(kernel_num=4, repr_dim=16).load_state_dict(state)


def test_deepcopy_keeps_one_chain_per_model():
    model = small_resnet()
    clone = copy.deepcopy(model)
    assert clone.chain is not model.chain
    assert all(layer.chain is clone.chain for _, layer in clone.kr_layers())
    clone.eval(), model.eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(clone(x), model(x))


def test_to_static_is_the_original_architecture():
    static = resnet18(num_classes=10)
    back = kr_convert(static, input_size=32, preserve_function=True).to_static()
    assert type(back.layer1[0].conv1) is nn.Conv2d
    assert set(back.state_dict()) == set(static.state_dict())


def test_unload_is_to_static_under_peft_name():
    """``unload()`` (PEFT's name) returns the plain model: same keys and weights as ``to_static()``,
    and at conversion time the original's outputs."""
    static = resnet18(num_classes=10).eval()
    model = kr_convert(copy.deepcopy(static), input_size=32)
    plain, back = model.unload().eval(), model.to_static().eval()
    assert type(plain.layer4[1].conv2) is nn.Conv2d and not any(
        isinstance(m, KRLayer) for m in plain.modules()
    )
    for key, value in back.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), static(x), rtol=1e-4, atol=1e-4)
    assert isinstance(model.backbone.layer4[1].conv2, KRLayer)  # the KR model is left as it is


def test_autocast_bfloat16_channels_last():
    model = small_resnet(kernel_num=4).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(x.contiguous())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    assert torch.isfinite(model.backbone.layer1[0].conv1.weight.grad).all()


def test_wrong_input_errors():
    model = small_resnet()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_backbone_called_alone_is_a_clear_error():
    model = small_resnet()
    with pytest.raises(RuntimeError, match="outside a KR forward pass"):
        model.backbone(torch.randn(1, 3, 32, 32))


def test_temperature():
    model = small_resnet()
    model.set_temperature(30.0)
    assert model.temperature == 30.0
    assert all(float(layer.generator.temperature) == 30.0 for _, layer in model.kr_layers())


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(self.stem(x).relu()).mean((2, 3)))


def test_torch_compile_inference_matches_eager():
    model = kr_convert(TinyNet(), input_size=16, kernel_num=4).eval()
    x = torch.randn(2, 3, 16, 16)
    # aot_eager: Dynamo's capture and AOTAutograd without C++ code generation (CI-sized).
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_inductor_resnet_inference_matches_eager():
    model = small_resnet(kernel_num=4).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_probe_falls_back_to_eval_mode_with_a_warning_and_a_report_line():
    # BatchNorm1d cannot train on a batch of one: the training-mode probe fails, eval mode works.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.BatchNorm1d(8), nn.Linear(8, 10),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="ran in eval mode instead"):
        kr_model = kr_convert(model, example_input=torch.randn(1, 3, 16, 16))
    report = kr_model.report
    assert report.probe_mode == "eval"
    assert "Expected more than 1 value per channel" in report.probe_fallback_reason
    assert report.as_dict()["probe_mode"] == "eval"
    assert "probe pass in eval mode" in str(report)
    assert kr_convert(model, input_size=16).report.probe_mode == "train"


def test_unknown_strategy_fails_at_conversion_not_at_the_first_forward():
    with pytest.raises(ValueError, match="strategy must be 'auto' or one of"):
        kr_convert(resnet18(num_classes=10), input_size=32, strategy="fastest")
    with pytest.raises(ValueError, match="strategy must be 'auto' or one of"):
        KRConv2d(4, 4, 3, strategy="fastest")
